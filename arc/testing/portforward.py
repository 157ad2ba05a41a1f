"""``kubectl port-forward`` into emulated pods, over SPDY, sans-I/O.

For each connection to its local port, kubectl opens two streams carrying
the same ``requestid`` header and the pod's ``port``: one with
``streamtype: error``, then one with ``streamtype: data``.  Once both are
open, L{PortForwardHandler} connects the data stream to the service the pod
runs on that port; when the service is done, both streams are half-closed.
A port nothing listens on gets the kubelet's kind of message on the error
stream, which kubectl prints before it stops with "lost connection to pod".

Every emulated pod serves HTTP on port L{HTTP_PORT} (L{HelloService}).
"""

from arc.testing import spdy

HTTP_PORT = 8080


class HelloService:
    """A one-request HTTP server: ``GET /`` answers ``hello from POD:PORT``.

    @param pod: the pod's name.
    @param port: the port it was reached on.
    @param write: called with the bytes to send to the client.
    @param close: called once the answer is complete.
    """

    def __init__(self, pod, port, write, close):
        self._greeting = f"hello from {pod}:{port}\n".encode()
        self._write = write
        self._close = close
        self._request = b""
        self._done = False

    def dataReceived(self, data):
        if self._done:
            return
        self._request += data
        if b"\r\n\r\n" in self._request or len(self._request) > 64 * 1024:
            self._answer(self._request.split(b"\r\n", 1)[0].split(b" "))

    def inputEnded(self):
        """The client sent all it will: answer what came, if nothing was answered."""
        if not self._done:
            self._answer(self._request.split(b"\r\n", 1)[0].split(b" "))

    def _answer(self, requestLine):
        self._done = True
        if len(requestLine) != 3 or not requestLine[2].startswith(b"HTTP/"):
            code, body = b"400 Bad Request", b"bad request\n"
        elif requestLine[0] not in (b"GET", b"HEAD"):
            code, body = b"405 Method Not Allowed", b"method not allowed\n"
        elif requestLine[1] != b"/":
            code, body = b"404 Not Found", b"not found\n"
        else:
            code, body = b"200 OK", self._greeting
        head = (
            b"HTTP/1.1 " + code + b"\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (len(body),)
        )
        self._write(head if requestLine[0] == b"HEAD" else head + body)
        self._close()


SERVICES = {HTTP_PORT: HelloService}


def refusal(pod, uid, port):
    """The error-stream message for a port nothing listens on."""
    return (
        f"error forwarding port {port} to pod {pod}, uid {uid}: failed to connect to "
        f"localhost:{port} inside the pod: connection refused "
        f"(emulated pods listen on port {HTTP_PORT} only)"
    )


class PortForwardHandler:
    """The handler of a L{arc.testing.spdysession.SpdySession} forwarding to one pod.

    @param session: the SPDY session.
    @param pod: the pod's name.
    @param uid: the pod's ``metadata.uid``, for error messages.
    """

    def __init__(self, session, pod, uid):
        self._spdy = session
        self._pod = pod
        self._uid = uid
        self._pending = {}
        self._services = {}

    def streamOpened(self, stream):
        kind, requestId = stream.header("streamtype"), stream.header("requestid")
        pair = self._pending.get(requestId, {})
        if kind not in ("error", "data") or kind in pair:
            self._spdy.reset(stream, spdy.PROTOCOL_ERROR)
            return
        pair[kind] = stream
        if len(pair) == 1:
            self._pending[requestId] = pair
            return
        del self._pending[requestId]
        self._connect(pair["data"], pair["error"])

    def _connect(self, data, error):
        port = data.header("port")
        service = SERVICES.get(int(port)) if port.isdigit() else None
        if service is None:
            self._spdy.send(error, refusal(self._pod, self._uid, port).encode())
            self._finish(data, error)
            return
        self._services[data.streamId] = service(
            self._pod,
            int(port),
            write=lambda payload: self._spdy.send(data, payload),
            close=lambda: self._finish(data, error),
        )

    def _finish(self, data, error):
        self._services.pop(data.streamId, None)
        self._spdy.finish(data)
        self._spdy.finish(error)

    def streamDataReceived(self, stream, data):
        service = self._services.get(stream.streamId)
        if service is not None:
            service.dataReceived(data)

    def streamEnded(self, stream):
        service = self._services.get(stream.streamId)
        if service is not None:
            service.inputEnded()

    def connectionLost(self):
        self._pending.clear()
        self._services.clear()

"""kubectl-facing side of the client: one stream per kubectl connection.

kubectl connects over TLS to the local listener (certificates from the local
CA).  The cluster is chosen by the TLS server name kubectl sends (the
kubeconfig context sets ``tls-server-name: CLUSTER.arc.localhost``), or by a
listener dedicated to one cluster.  Each connection becomes one stream on
the client's tunnel; the request bytes follow the stream open at once (no
round trip is spent waiting for the agent).

When no answer can come — cluster unknown, not allowed, offline, relay
unreachable — kubectl gets a Kubernetes ``Status`` naming the cluster and
the cause, never a hang or a bare reset.
"""

import json

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from arc import status
from arc.client.localca import SERVER_NAME_SUFFIX as _DOMAIN
from arc.ratelog import RateLimitedLog
from arc.tls import set_nodelay
from arc.tunnel import frames as F
from arc.tunnel.pipe import StreamPipe
from arc.tunnel.session import RefuseStream
from arc.tunnel.stream import Stream, StreamReset

MAX_HEAD_SCAN = 64 * 1024
SERVER_NAME_SUFFIX = "." + _DOMAIN


class ClientPipe(StreamPipe):
    reset_on_socket_loss = True

    def __init__(self, connection):
        super().__init__()
        self.connection = connection
        self.answered = False

    def dataReceived(self, data):
        self.answered = True
        super().dataReceived(data)

    def connectionLost(self, reason):
        exc = reason.value
        if (not self.answered and isinstance(exc, StreamReset)
                and exc.code != F.CANCELLED and self.socket is not None):
            self.stream_done = True
            socket, self.socket = self.socket, None
            socket.unregisterProducer()
            code, message = status.for_reset(exc.code, exc.reason)
            self.connection.answer(code, message)
            return
        super().connectionLost(reason)


@implementer(IHandshakeListener)
class KubectlConnection(Protocol):
    log = Logger()

    def __init__(self, proxy, cluster=None):
        self.proxy = proxy
        self.cluster = cluster
        self.pipe = None
        self._head = bytearray()
        self._head_seen = False
        self._answer = None
        self._timer = None
        self.violations = None

    def connectionMade(self):
        set_nodelay(self.transport)
        timeout = getattr(self.proxy, "head_timeout", None)
        clock = getattr(self.proxy, "reactor", None)
        if timeout and clock is not None:
            # The TLS handshake and the first request head must come in time:
            # connections that send nothing (or a byte now and then) are dropped.
            self._timer = clock.callLater(timeout, self._head_timeout, timeout)

    def _head_timeout(self, timeout):
        self._timer = None
        if self.violations is not None:
            peer = self.transport.getPeer()
            self.violations.emit(("head-timeout", getattr(peer, "host", None)), self.log.info,
                                 "kubectl connection from {peer} sent no complete TLS "
                                 "handshake and request head within {t} s; closing",
                                 peer=str(peer), t=timeout)
        self.transport.abortConnection()

    def _cancel_timer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def handshakeCompleted(self):
        cluster = self.cluster
        if cluster is None:
            name = self.transport.getHandle().get_servername()
            name = name.decode("ascii", "replace") if name else ""
            if not name.endswith(SERVER_NAME_SUFFIX):
                self.answer(400, "no cluster selected: connect with TLS server name "
                                 "CLUSTER%s (set tls-server-name in the kubeconfig, as "
                                 "arc-client writes it)" % (SERVER_NAME_SUFFIX,))
                return
            cluster = name[:-len(SERVER_NAME_SUFFIX)]
        if cluster not in self.proxy.clusters:
            self.answer(404, "cluster %r is not configured in this arc client (add it under "
                             "clusters: in %s)" % (cluster, self.proxy.config_file))
            return
        self.cluster = cluster
        session = self.proxy.session()
        if session is None:
            self.answer(503, "cannot reach cluster %r: the tunnel to the relay %s is down (%s)"
                        % (cluster, self.proxy.relay_url, self.proxy.tunnel_problem()))
            return
        metadata = json.dumps({"cluster": cluster}).encode()
        stream = Stream(session, metadata)
        try:
            sid = session.open(stream, metadata)
        except RefuseStream as e:
            self.answer(503, "cannot reach cluster %r: %s" % (cluster, e.reason))
            return
        stream.opened(sid, session.limits.open_timeout)
        if self.proxy.stream_observer is not None:
            self.proxy.stream_observer.watch(stream)
        self.pipe = ClientPipe(self)
        stream.attach(self.pipe)
        self.pipe.socket_connected(self.transport)

    def answer(self, code, message):
        """Answer kubectl with a Status once its request head is in, then close."""
        self.log.info("answering kubectl with {code}: {message}", code=code, message=message)
        self.pipe = None
        self._answer = status.status_response(code, message)
        if self._head_seen:
            self._send_answer()

    def _send_answer(self):
        answer, self._answer = self._answer, None
        self.transport.write(answer)
        self.transport.loseConnection()

    def dataReceived(self, data):
        if not self._head_seen:
            self._head += data
            if b"\r\n\r\n" in self._head or len(self._head) > MAX_HEAD_SCAN:
                self._head_seen = True
                self._head = None
                self._cancel_timer()
        if self.pipe is not None:
            self.pipe.socket_data(data)
        elif self._answer is not None and self._head_seen:
            self._send_answer()

    def connectionLost(self, reason):
        self._cancel_timer()
        if self.pipe is not None:
            self.pipe.socket_lost(reason)


class KubectlFactory(Factory):
    def __init__(self, proxy, cluster=None):
        self.proxy = proxy
        self.cluster = cluster
        clock = getattr(proxy, "reactor", None)
        self.violations = RateLimitedLog(clock) if clock is not None else None

    def buildProtocol(self, addr):
        connection = KubectlConnection(self.proxy, self.cluster)
        connection.violations = self.violations
        return connection

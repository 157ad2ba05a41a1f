"""Twisted glue for SPDY: on an upgraded HTTP connection, or inside a WebSocket.

L{switchToSpdy} answers an HTTP request with ``101 Switching Protocols``
and hands its connection to a L{SpdyProtocol}; L{spdyOverWebSocket} is a
resource that accepts a WebSocket and carries SPDY in its binary messages
(``SPDY/3.1+portforward.k8s.io``).  Either way the SPDY itself is the
sans-I/O L{arc.testing.spdysession.SpdySession}, and what its streams mean
is up to its handler.
"""

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.server import NOT_DONE_YET

from arc.testing.spdysession import SpdySession


class SpdyProtocol(Protocol):
    """SPDY/3.1 directly on a connection taken over from the HTTP server.

    @param makeHandler: called with the L{SpdySession}, returns its handler.
    @param streams: a set this protocol belongs to while connected, so
        that a stopping server can drop it.
    """

    session = None

    def __init__(self, makeHandler, streams):
        self._makeHandler = makeHandler
        self._streams = streams

    def connectionMade(self):
        self._streams.add(self)
        self.session = SpdySession(
            self._makeHandler, self.transport.write, self.transport.loseConnection
        )

    def dataReceived(self, data):
        self.session.dataReceived(data)

    def connectionLost(self, reason):
        self._streams.discard(self)
        self.session.connectionLost()

    def stopStreaming(self):
        """Drop the connection because the server is stopping."""
        self.transport.abortConnection()


def switchToSpdy(request, makeHandler, streams):
    """Answer C{request} with 101 and speak SPDY on its connection from then on.

    The 101 carries the request's response headers, which the caller has
    set (``Upgrade``, ``Connection``, ``X-Stream-Protocol-Version``).

    @return: L{NOT_DONE_YET}, for the resource to return.
    """
    request.setResponseCode(101)
    lines = [b"HTTP/1.1 101 Switching Protocols"] + [
        name + b": " + value
        for name, values in request.responseHeaders.getAllRawHeaders()
        for value in values
    ]
    transport, request.channel.transport = request.channel.transport, None
    transport.unregisterProducer()
    transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
    protocol = SpdyProtocol(makeHandler, streams)
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    transport.resumeProducing()
    return NOT_DONE_YET


class SpdyWebSocketProtocol(WebSocketServerProtocol):
    """SPDY/3.1 carried in the binary messages of a WebSocket."""

    session = None

    def onConnect(self, request):
        return self.factory.subprotocol

    def onOpen(self):
        self.factory.streams.add(self)
        self.session = SpdySession(
            self.factory.makeHandler,
            lambda data: self.sendMessage(data, isBinary=True),
            lambda: self.sendClose(1000),
        )

    def onMessage(self, payload, isBinary):
        self.session.dataReceived(payload)

    def onClose(self, wasClean, code, reason):
        if self.session is not None:
            self.factory.streams.discard(self)
            self.session.connectionLost()

    def stopStreaming(self):
        """Drop the connection because the server is stopping."""
        self.dropConnection(abort=True)


def spdyOverWebSocket(subprotocol, makeHandler, streams):
    """A one-shot resource that upgrades its request to SPDY inside a WebSocket.

    @param subprotocol: the WebSocket subprotocol already chosen.
    @param makeHandler: called with the L{SpdySession}, returns its handler.
    @param streams: the set the open connection belongs to (see L{SpdyProtocol}).
    """
    factory = WebSocketServerFactory()
    factory.protocol = SpdyWebSocketProtocol
    factory.subprotocol = subprotocol
    factory.makeHandler = makeHandler
    factory.streams = streams
    return WebSocketResource(factory)

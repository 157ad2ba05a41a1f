"""Join a tunnel stream and a socket connection, with backpressure both ways.

:class:`StreamPipe` is the protocol run on a :class:`~arc.tunnel.stream.Stream`
whose other end is an ordinary Twisted connection (the agent's connection to
kube-apiserver, the client's connection from kubectl).  Each side is
registered as the other's producer, so a full socket buffer withholds
stream credit and an exhausted stream window pauses reading from the socket.
"""

from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from arc.tls import set_nodelay
from arc.tlssocket import is_tls
from arc.tunnel import frames as F
from arc.tunnel.stream import StreamReset


@implementer(IHalfCloseableProtocol)
class StreamPipe(Protocol):
    """Runs on the stream; ``peer`` is the socket-side protocol.

    The socket side calls :meth:`socket_connected`, :meth:`socket_data` and
    :meth:`socket_lost`.

    When the socket ends, ``reset_on_socket_loss`` decides what the stream
    peer is told: False sends FIN after every byte (the agent: the API
    server finished its answer), True resets the stream (the client: kubectl
    went away, so nobody is left to read an answer) unless the peer had
    already finished.
    """

    reset_on_socket_loss = False

    def __init__(self):
        self.socket = None          # the socket transport, once connected
        self.early = []             # stream data that came before the socket
        self.stream_done = False
        self.peer_finished = False

    # -- stream side ----------------------------------------------------------

    def connectionMade(self):
        if self.socket is None:
            # Withhold credit until there is somewhere to put the data.
            self.transport.pauseProducing()

    def dataReceived(self, data):
        if self.socket is None:
            self.early.append(data)
        else:
            self.socket.write(data)

    def readConnectionLost(self):
        self.peer_finished = True
        socket = self.socket
        if socket is None:
            self.early.append(None)
            return
        if _supports_half_close(socket):
            socket.loseWriteConnection()
        elif not self.reset_on_socket_loss:
            # TLS cannot half-close: the answer may still come; the socket's
            # own end (or a stream reset) finishes the stream.
            pass
        else:
            # The answer is complete: close the socket once it is written.
            # Twisted's TLS layer closes only after its producer (this
            # stream) is unregistered, and the stream itself ends only when
            # the socket does: without this, kubectl waits forever for the
            # end of a body that lasts until the connection closes.
            socket.unregisterProducer()
            socket.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.stream_done = True
        socket, self.socket = self.socket, None
        if socket is not None:
            socket.unregisterProducer()
            self.stream_lost(socket, reason)

    def stream_lost(self, socket, reason):
        if reason.check(StreamReset):
            # Reset: nobody will read an answer, so don't wait to flush one.
            socket.abortConnection()
        else:
            socket.loseConnection()

    # -- socket side ----------------------------------------------------------

    def socket_connected(self, transport):
        if self.stream_done:
            transport.abortConnection()
            return
        self.socket = transport
        early, self.early = self.early, []
        for chunk in early:
            if chunk is None:
                self.readConnectionLost()
            else:
                transport.write(chunk)
        transport.registerProducer(self.transport, True)
        self.transport.registerProducer(transport, True)
        self.transport.resumeProducing()

    def socket_data(self, data):
        self.transport.write(data)

    def socket_lost(self, reason):
        if self.socket is None:
            return
        self.socket = None
        self.transport.unregisterProducer()
        if self.reset_on_socket_loss and not self.peer_finished:
            self.transport.reset(F.CANCELLED, "the connection from kubectl was closed")
        else:
            self.transport.loseConnection()


def _supports_half_close(transport):
    """Plain TCP can half-close; TLS connections are not half-closed here.

    (A TLS 1.3 ``close_notify`` could close one direction, but kubectl and
    API servers treat it as the end of the connection.)
    """
    if isinstance(transport, TLSMemoryBIOProtocol) or is_tls(transport):
        return False
    return ITCPTransport.providedBy(transport)


class SocketSide(Protocol):
    """The socket-side protocol feeding a :class:`StreamPipe`."""

    def __init__(self, pipe):
        self.pipe = pipe

    def connectionMade(self):
        set_nodelay(self.transport)
        self.pipe.socket_connected(self.transport)

    def dataReceived(self, data):
        self.pipe.socket_data(data)

    def connectionLost(self, reason):
        self.pipe.socket_lost(reason)

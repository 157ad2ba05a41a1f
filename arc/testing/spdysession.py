"""The server side of one SPDY/3.1 connection, sans-I/O: streams the client opens.

A L{SpdySession} is fed the bytes the client sends and writes the bytes to
answer through a callable; a handler (exec, attach or port-forward) hears
about streams and sends data on them through the session.  Like the
kubelet, the session accepts every stream the client opens with a SYN_REPLY
at once, answers the client's PINGs and opens no stream itself.

There is no flow control: kubectl's SPDY library neither sends WINDOW_UPDATE
frames nor waits for them, so the session ignores them too and never holds
data back.

The handler is built by C{makeHandler(session)} and provides:

    - C{streamOpened(stream)}: a new L{Stream}, its headers in C{stream.headers};
    - C{streamDataReceived(stream, data)};
    - C{streamEnded(stream)}: the client will send no more on it (FIN or reset);
    - C{connectionLost()}: the connection is gone; nothing can be sent.
"""

from twisted.logger import Logger

from arc.testing import spdy

MAX_DATA = 16 * 1024


class Stream:
    """One stream the client opened.

    @ivar headers: the SYN_STREAM's headers, a tuple of C{(name, value)}.
    @ivar localClosed: whether this side sent its FIN (or a reset).
    @ivar remoteClosed: whether the client sent its FIN (or a reset).
    """

    def __init__(self, streamId, headers):
        self.streamId = streamId
        self.headers = headers
        self.localClosed = False
        self.remoteClosed = False

    def header(self, name, default=""):
        """The first value of header C{name} (a lower-case name)."""
        values = spdy.headerValues(self.headers, name)
        return values[0] if values else default


class SpdySession:
    """One SPDY/3.1 connection, server side.

    @param makeHandler: called with the session, returns its handler.
    @param write: called with bytes to send to the client.
    @param disconnect: called once to close the connection.
    """

    log = Logger()

    def __init__(self, makeHandler, write, disconnect):
        self._write = write
        self._disconnect = disconnect
        self._encoder = spdy.FrameEncoder()
        self._decoder = spdy.FrameDecoder()
        self._streams = {}
        self._lastStreamId = 0
        self._closing = False
        self._connected = True
        self.handler = makeHandler(self)

    def dataReceived(self, data):
        """Handle bytes from the client."""
        if not self._connected:
            return
        try:
            frames = self._decoder.feed(data)
        except spdy.ProtocolError as e:
            self.log.warn("SPDY protocol error from the client: {error}", error=str(e))
            self._send(spdy.GoAway(self._lastStreamId, spdy.GOAWAY_PROTOCOL_ERROR))
            self._close()
            return
        for frame in frames:
            if self._connected:
                self._frameReceived(frame)

    def connectionLost(self):
        """The connection is gone (closed by either side)."""
        if self._connected:
            self._connected = False
            self._streams.clear()
            self.handler.connectionLost()

    def send(self, stream, data):
        """Send C{data} on C{stream}, in frames of at most L{MAX_DATA} bytes."""
        if stream.localClosed or not self._connected:
            return
        for offset in range(0, len(data), MAX_DATA):
            self._send(spdy.DataFrame(stream.streamId, data[offset : offset + MAX_DATA]))

    def finish(self, stream):
        """Half-close C{stream}: this side sends no more on it."""
        if stream.localClosed or not self._connected:
            return
        stream.localClosed = True
        self._send(spdy.DataFrame(stream.streamId, b"", fin=True))
        self._forgetIfClosed(stream)

    def reset(self, stream, status):
        """Abort C{stream} in both directions."""
        if not self._connected or stream.streamId not in self._streams:
            return
        stream.localClosed = stream.remoteClosed = True
        self._send(spdy.RstStream(stream.streamId, status))
        self._forgetIfClosed(stream)

    def goAway(self):
        """Accept no new streams; disconnect once every stream is closed both ways."""
        if self._closing or not self._connected:
            return
        self._closing = True
        self._send(spdy.GoAway(self._lastStreamId))
        if not self._streams:
            self._close()

    def _send(self, frame):
        self._write(self._encoder.encode(frame))

    def _close(self):
        if self._connected:
            self._disconnect()
            self.connectionLost()

    def _forgetIfClosed(self, stream):
        if stream.localClosed and stream.remoteClosed:
            self._streams.pop(stream.streamId, None)
            if self._closing and not self._streams:
                self._close()

    def _frameReceived(self, frame):
        kind = type(frame)
        if kind is spdy.SynStream:
            self._synStream(frame)
        elif kind is spdy.DataFrame:
            self._data(frame)
        elif kind is spdy.RstStream:
            stream = self._streams.get(frame.streamId)
            if stream is not None:
                stream.localClosed = True
                self._remoteEnd(stream)
        elif kind is spdy.Ping:
            if frame.pingId % 2 == 1:
                self._send(frame)
        elif kind is spdy.GoAway:
            self.goAway()

    def _synStream(self, frame):
        if frame.streamId % 2 == 0 or frame.streamId <= self._lastStreamId:
            self._send(spdy.RstStream(frame.streamId, spdy.PROTOCOL_ERROR))
            return
        self._lastStreamId = frame.streamId
        if self._closing:
            self._send(spdy.RstStream(frame.streamId, spdy.REFUSED_STREAM))
            return
        stream = Stream(frame.streamId, frame.headers)
        self._streams[stream.streamId] = stream
        if frame.unidirectional:
            stream.localClosed = True
        else:
            self._send(spdy.SynReply(stream.streamId))
        self.handler.streamOpened(stream)
        if frame.fin and self._connected:
            self._remoteEnd(stream)

    def _data(self, frame):
        stream = self._streams.get(frame.streamId)
        if stream is None or stream.remoteClosed:
            status = spdy.INVALID_STREAM if stream is None else spdy.STREAM_ALREADY_CLOSED
            self._send(spdy.RstStream(frame.streamId, status))
            return
        if frame.data:
            self.handler.streamDataReceived(stream, frame.data)
        if frame.fin and self._connected:
            self._remoteEnd(stream)

    def _remoteEnd(self, stream):
        if not stream.remoteClosed:
            stream.remoteClosed = True
            self.handler.streamEnded(stream)
        self._forgetIfClosed(stream)

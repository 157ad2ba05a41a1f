"""One tunnel stream as a Twisted transport.

:class:`Stream` is the handler a :class:`~arc.tunnel.session.Session` uses
for streams that end at this process.  It provides ``ITransport`` (any
Twisted protocol can run on it), ``IPushProducer`` (a consumer that fills
up pauses it) and ``IConsumer`` (a source registered on it is paused while
the peer grants no credit).

Flow control: the peer may send ``INITIAL_WINDOW`` bytes before it needs
credit.  Data is handed to the protocol as it arrives, and credit is
returned (WINDOW_UPDATE) only for data delivered while this stream is not
paused: a consumer that stops reading stops the sender after one window,
without affecting any other stream of the tunnel.
"""

from collections import deque

from twisted.internet import error
from twisted.internet.interfaces import (IAddress, IConsumer, IHalfCloseableProtocol,
                                         IPushProducer, ITransport)
from twisted.python.failure import Failure
from zope.interface import implementer

from arc.tunnel import frames as F
from arc.tunnel.session import BULK_AFTER


class StreamReset(error.ConnectionLost):
    """The stream was reset: by the peer, a limit, or the tunnel's loss."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def __str__(self):
        return "%s: %s" % (F.ERROR_NAMES.get(self.code, self.code), self.reason)


@implementer(IAddress)
class TunnelAddress:
    """Where a stream comes from: the tunnel's name and the stream id."""

    def __init__(self, tunnel, stream_id):
        self.tunnel = tunnel
        self.stream_id = stream_id

    def __repr__(self):
        return "TunnelAddress(%s, %d)" % (self.tunnel, self.stream_id)


@implementer(ITransport, IPushProducer, IConsumer)
class Stream:
    """An endpoint stream: a transport over the tunnel."""

    disconnecting = False
    disconnected = False
    # Told ``stream_acked(stream)`` at the first ACK and ``stream_ended(stream,
    # reason)`` once, at the end (metrics: arc.ops.tunnelend); None: nobody.
    observer = None

    def __init__(self, session, metadata=b"", *, window=None):
        self.session = session
        self.id = None
        self.metadata = metadata
        self.protocol = None
        if window is None:
            window = session.limits.stream_window
        self.window = max(window, F.INITIAL_WINDOW)
        self._send_window = F.INITIAL_WINDOW
        self._granted = F.INITIAL_WINDOW
        self._unacked = 0
        self._pending = deque()
        self._pending_bytes = 0
        self._fin_sent = False
        self._fin_received = False
        self._producer = None
        self._source_paused = False
        self._paused = False
        self._inbox = []
        self._ended = None
        self._open_timer = None
        self.acked = False
        self.bytes_in = 0
        self.bytes_out = 0

    # -- life cycle ---------------------------------------------------------

    def opened(self, sid, open_timeout=None):
        """Called once the id is known, for streams opened by this side.

        A window larger than the protocol's initial one is granted at once.
        """
        self.id = sid
        extra = self.window - F.INITIAL_WINDOW
        if extra:
            self._granted += extra
            self.session.send_frame(F.WINDOW_UPDATE, 0, sid, extra)
        if open_timeout:
            self._open_timer = self.session.clock.callLater(open_timeout, self._open_timed_out)

    def accept(self, sid):
        """Accept a stream the peer opened (sends ACK, plus extra credit)."""
        self.id = sid
        self.acked = True
        extra = max(0, self.window - F.INITIAL_WINDOW)
        self._granted += extra
        self.session.send_frame(F.WINDOW_UPDATE, F.ACK, sid, extra)

    def attach(self, protocol):
        """Run ``protocol`` on this stream; data that came early is delivered."""
        self.protocol = protocol
        protocol.makeConnection(self)
        if self._ended is not None:
            # Reset before any protocol was attached: tell this one at once.
            self.protocol = None
            protocol.connectionLost(Failure(self._ended))
            return
        inbox, self._inbox = self._inbox, []
        for chunk in inbox:
            if self.disconnected:
                return
            if chunk is None:
                self._deliver_fin()
            else:
                self._deliver(chunk)

    def _open_timed_out(self):
        self._open_timer = None
        if not self.acked and not self.disconnected:
            self.reset(F.TIMEOUT, "no answer to the stream open within %.0f s"
                       % (self.session.limits.open_timeout,))

    # -- frames from the session -----------------------------------------------

    def frameReceived(self, ftype, flags, value, payload):
        if flags & F.RST:
            code, reason = F.parse_rst(payload)
            self._terminate(StreamReset(code, reason))
            return
        if flags & F.ACK and not self.acked:
            self.acked = True
            if self._open_timer is not None:
                self._open_timer.cancel()
                self._open_timer = None
            if self.observer is not None:
                self.observer.stream_acked(self)
        if ftype == F.WINDOW_UPDATE:
            if value:
                self._send_window += value
                self._flush()
        elif payload:
            n = len(payload)
            if n > self._granted:
                self.reset(F.FLOW_CONTROL_ERROR, "peer sent %d bytes with %d bytes of credit"
                           % (n, self._granted))
                return
            self._granted -= n
            self.bytes_in += n
            if self.protocol is None:
                self._inbox.append(payload)
            else:
                self._deliver(payload)
        if flags & F.FIN and not self.disconnected:
            self._fin_received = True
            if self.protocol is None:
                self._inbox.append(None)
            else:
                self._deliver_fin()

    def tunnelLost(self, code, reason):
        self._terminate(StreamReset(code, reason), remove=False)

    def _deliver(self, data):
        self.protocol.dataReceived(data)
        self._unacked += len(data)
        if not self._paused and self._unacked >= self.window // 2:
            self._credit()

    def _credit(self):
        if self._unacked and not self.disconnected and not self._fin_received:
            self._granted += self._unacked
            self.session.send_frame(F.WINDOW_UPDATE, 0, self.id, self._unacked)
        self._unacked = 0

    def _deliver_fin(self):
        if IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
            self._maybe_done()
        else:
            # A protocol that cannot half-close ends with the peer's FIN.
            self.loseConnection()
            self._maybe_done(force=True)

    def _maybe_done(self, force=False):
        if self.disconnected:
            return
        if (self._fin_sent or force) and self._fin_received and not self._pending:
            self._terminate(error.ConnectionDone("stream closed"))

    # -- sending ------------------------------------------------------------

    def write(self, data):
        if self.disconnected or self.disconnecting or not data:
            return
        if self._pending or len(data) > self._send_window:
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._flush()
            return
        self._send_data(data)

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def _send_data(self, data):
        n = len(data)
        self._send_window -= n
        self.bytes_out += n
        bulk = self.bytes_out > BULK_AFTER
        limit = self.session.limits.max_frame
        header = F.header
        if n <= limit:
            self.session.send([header(F.DATA, 0, self.id, n), data], bulk)
            return
        view = memoryview(data)
        chunks = []
        for i in range(0, n, limit):
            part = view[i:i + limit]
            chunks.append(header(F.DATA, 0, self.id, len(part)))
            chunks.append(part)
        self.session.send(chunks, bulk)

    def _flush(self):
        pending = self._pending
        while pending and self._send_window > 0:
            data = pending[0]
            if len(data) <= self._send_window:
                pending.popleft()
                self._pending_bytes -= len(data)
                self._send_data(data)
            else:
                room = self._send_window
                pending[0] = data[room:]
                self._pending_bytes -= room
                self._send_data(data[:room])
        if pending:
            self._pause_source()
        else:
            self._resume_source()
            if self.disconnecting and not self._fin_sent:
                self._send_fin()

    @property
    def buffered(self):
        """Bytes written but not yet sent for lack of credit."""
        return self._pending_bytes

    def _pause_source(self):
        if self._producer is not None and not self._source_paused:
            self._source_paused = True
            self._producer.pauseProducing()

    def _resume_source(self):
        if self._producer is not None and self._source_paused:
            self._source_paused = False
            self._producer.resumeProducing()

    def _send_fin(self):
        self._fin_sent = True
        # After the stream's last data, even when that waits in the session.
        self.session.send_frame(F.DATA, F.FIN, self.id, 0, bulk=self.bytes_out > BULK_AFTER)
        self._maybe_done()

    def loseConnection(self):
        """Half-close: FIN after every byte already written is sent."""
        if self.disconnected or self.disconnecting:
            return
        self.disconnecting = True
        if not self._pending:
            self._send_fin()

    loseWriteConnection = loseConnection

    def abortConnection(self):
        self.reset(F.CANCELLED, "stream aborted")

    def reset(self, code, reason):
        """Reset the stream now, telling the peer why."""
        if self.disconnected:
            return
        if self.id is not None:
            self.session.send_reset(self.id, code, reason)
        self._terminate(StreamReset(code, reason))

    def _terminate(self, reason, remove=True):
        if self.disconnected:
            return
        self.disconnected = True
        self.disconnecting = False
        if remove and self.id is not None:
            self.session.remove(self.id)
        if self._open_timer is not None:
            if self._open_timer.active():
                self._open_timer.cancel()
            self._open_timer = None
        self._pending.clear()
        self._pending_bytes = 0
        self._inbox = []
        producer, self._producer = self._producer, None
        if producer is not None and self._source_paused:
            self._source_paused = False
            producer.resumeProducing()
        if self.observer is not None:
            self.observer.stream_ended(self, reason)
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(Failure(reason))
        else:
            self._ended = reason

    # -- IPushProducer: our consumer pauses us --------------------------------

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        if self._unacked:
            self._credit()

    def stopProducing(self):
        # The consumer is gone for good.  Whoever owns the stream decides how
        # it ends (a pipe closes it when its socket's connectionLost comes,
        # which Twisted delivers right after this call).
        self._paused = True

    # -- IConsumer: a source writing into us --------------------------------------

    def registerProducer(self, producer, streaming):
        self._producer = producer
        self._source_paused = False
        if self._pending:
            self._pause_source()

    def unregisterProducer(self):
        self._producer = None
        self._source_paused = False

    # -- ITransport odds and ends ---------------------------------------------

    def getPeer(self):
        return TunnelAddress(self.session.name, self.id)

    def getHost(self):
        return TunnelAddress(self.session.name, self.id)

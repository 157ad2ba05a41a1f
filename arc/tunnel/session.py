"""The tunnel session: many streams over one ordered byte carrier.

A :class:`Session` owns the connection-level state of one tunnel: the frame
decoder, stream-id allocation, keepalive and dead-peer detection, GOAWAY and
the limits.  It never touches a socket: the carrier adaptor (see
``arc.tunnel.carrier``) feeds it bytes with :meth:`Session.dataReceived` and
gives it a ``send`` callable taking a list of byte strings.  Time comes from
an injected ``IReactorTime``, so every timer is testable with ``Clock``.

Each stream is served by a *handler*: any object with
``frameReceived(ftype, flags, value, payload)`` and ``tunnelLost(code,
reason)``.  Endpoints use :class:`arc.tunnel.stream.Stream` (an
``ITransport`` any Twisted protocol can run on); the relay uses splice halves
that forward frames to another session without decoding payloads.
"""

from collections import deque
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from arc.tunnel import frames as F

# Head-of-line blocking: a stream that has sent this many bytes is "bulk";
# its further frames wait in the session while the carrier already holds
# CARRIER_BUFFER bytes, so that the frames of other streams (small answers,
# control frames, credit) never queue behind a large download.
BULK_AFTER = 64 * 1024
CARRIER_BUFFER = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """Tunnel limits; every one is configurable."""

    max_frame: int = F.DEFAULT_MAX_FRAME
    max_streams: int = 10000
    ping_interval: float = 15.0
    dead_after: float = 45.0
    open_timeout: float = 30.0
    drain_timeout: float = 30.0
    # Streams this side opened that the peer has not answered yet (no frame
    # back): a stalled peer cannot make the opener pile up half-open streams.
    max_pending_opens: int = 1000
    # Bytes of one stream the peer may have in flight towards this side: the
    # protocol's initial window, raised by the first WINDOW_UPDATE.  A
    # stream's data crosses three hops, so one window must cover the time
    # credit takes to come back through all of them (docs/performance.md).
    stream_window: int = 256 * 1024


class RefuseStream(Exception):
    """Raised by an ``on_open`` callback to refuse an incoming stream."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Session:
    """Connection-level state of one tunnel (sans-I/O, clock injected).

    :param dialer: True on the side that opened the connection; it uses odd
        stream ids, the accepting side even ones.
    :param on_open: ``on_open(session, stream_id, metadata) -> handler``;
        may raise :class:`RefuseStream`.  ``None`` refuses every open.
    :param on_goaway: ``on_goaway(session, code)`` when the peer drains.
    :param on_close: ``on_close(session, code, reason)`` once, when the
        tunnel ends for any reason.
    :param views: hand DATA payloads to handlers as memoryviews of the
        bytes received instead of ``bytes`` (handlers that only pass them on).

    A DATA frame may reach its handler in several pieces (as its bytes
    arrive); only the last carries the frame's flags.

    Frames are sent in order, except that frames marked *bulk* (those of a
    stream past its first :data:`BULK_AFTER` bytes) wait in the session
    while the carrier's buffer holds :data:`CARRIER_BUFFER` bytes or more,
    and are handed on, in order, as the carrier drains (see :meth:`pace`).
    """

    log = Logger()
    # The carrier's transport, set by the carrier: for measurements, and to
    # abort a dead tunnel (a graceful TLS close would wait for the dead peer).
    transport = None

    def __init__(self, *, dialer, clock, limits=Limits(), name="tunnel",
                 on_open=None, on_goaway=None, on_close=None, views=False):
        self.dialer = dialer
        self.clock = clock
        self.limits = limits
        self.name = name
        self.on_open = on_open
        self.on_goaway = on_goaway
        self.on_close = on_close
        self.streams = {}
        self.pending_opens = set()
        self._idle_waiters = []
        self._next_id = 1 if dialer else 2
        # DATA payloads are handed on as they arrive (the relay: as views of
        # the bytes read, forwarded without a copy).
        self._decoder = F.PieceDecoder(limits.max_frame, views=views)
        self._send = None
        self._close_transport = None
        self._timer = None
        self._last_rx = clock.seconds()
        self._next_ping = None
        self._ping_sent = {}
        self._ping_seq = 0
        self.rtt = None
        self.local_goaway = False
        self.remote_goaway = False
        self.closed = False
        self.close_reason = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._bulk = deque()
        self._buffered = None     # () -> bytes the carrier still holds, once paced

    # -- carrier side ------------------------------------------------------

    def pace(self, transport):
        """Hold bulk frames back while ``transport`` holds enough bytes.

        ``transport`` (an :mod:`arc.tlssocket` connection) tells how many
        bytes it still has to send (``buffered_bytes()``) and calls
        ``drained()`` each time it has sent everything.
        """
        self._buffered = transport.buffered_bytes
        transport.drained = self._carrier_drained

    def _carrier_drained(self):
        """The carrier wrote everything it had: hand on held bulk frames."""
        bulk = self._bulk
        if not bulk or self.closed:
            return
        buffered = self._buffered
        send = self._send
        while bulk and buffered() < CARRIER_BUFFER:
            chunks = bulk.popleft()
            for chunk in chunks:
                self.bytes_out += len(chunk)
            send(chunks)

    def _unpace(self):
        if self._buffered is not None:
            self._buffered = None
            self._bulk.clear()
            self.transport.drained = None

    def connected(self, send, close):
        """The carrier is ready: ``send(list_of_bytes)``, ``close()``."""
        self._send = send
        self._close_transport = close
        now = self._last_rx = self.clock.seconds()
        if self.limits.ping_interval:
            self._next_ping = now + self.limits.ping_interval
            self._schedule(now)

    def dataReceived(self, data):
        if self.closed:
            return
        self._last_rx = self.clock.seconds()
        self.bytes_in += len(data)
        try:
            received = self._decoder.feed(data)
        except F.ProtocolError as e:
            self.fail(e.code, str(e))
            return
        streams = self.streams
        pending = self.pending_opens
        for ftype, flags, sid, value, payload in received:
            if ftype == F.DATA or ftype == F.WINDOW_UPDATE:
                if flags & F.SYN:
                    self._incoming(ftype, flags, sid, value, payload)
                else:
                    if pending and sid in pending:
                        pending.discard(sid)
                    handler = streams.get(sid)
                    if handler is not None:
                        handler.frameReceived(ftype, flags, value, payload)
                    # Frames for streams already gone are late arrivals: dropped.
            elif ftype == F.PING:
                self._ping(flags, value)
            else:
                self._goaway_received(value)
            if self.closed:
                return

    def connectionLost(self, why="tunnel connection lost"):
        """The carrier is gone: reset every stream."""
        self._shutdown(F.TUNNEL_LOST, why)

    # -- stream side -------------------------------------------------------

    def send(self, chunks, bulk=False):
        if self._send is None or self.closed:
            return
        if bulk and self._buffered is not None and (
                self._bulk or self._buffered() >= CARRIER_BUFFER):
            self._bulk.append(chunks)
            return
        for chunk in chunks:
            self.bytes_out += len(chunk)
        self._send(chunks)

    @property
    def held(self):
        """Bytes of bulk frames waiting for the carrier to drain."""
        return sum(len(c) for chunks in self._bulk for c in chunks)

    def send_frame(self, ftype, flags, sid, value, payload=b"", bulk=False):
        if payload:
            self.send([F.header(ftype, flags, sid, value), payload], bulk)
        else:
            self.send([F.header(ftype, flags, sid, value)], bulk)

    def send_reset(self, sid, code, reason):
        payload = F.rst_payload(code, reason)
        self.send_frame(F.DATA, F.RST, sid, len(payload), payload)

    def can_open(self):
        return not (self.closed or self.local_goaway or self.remote_goaway)

    def open(self, handler, metadata=b""):
        """Open a stream served by ``handler``; returns its id.

        ``handler`` may be a callable taking the new id and returning the
        handler, for handlers that need their id at construction.
        """
        if not self.can_open():
            raise RefuseStream(F.GOING_AWAY, "tunnel %s is closing" % (self.name,))
        if len(self.streams) >= self.limits.max_streams:
            raise RefuseStream(F.LIMIT_EXCEEDED,
                               "tunnel %s has reached its limit of %d streams"
                               % (self.name, self.limits.max_streams))
        if len(self.pending_opens) >= self.limits.max_pending_opens:
            raise RefuseStream(F.LIMIT_EXCEEDED,
                               "tunnel %s has %d stream opens the peer has not answered yet "
                               "(limit tunnel.max_pending_opens)"
                               % (self.name, len(self.pending_opens)))
        sid = self._next_id
        if sid > F.MAX_STREAM_ID:
            raise RefuseStream(F.LIMIT_EXCEEDED, "stream ids exhausted on tunnel %s" % self.name)
        self._next_id += 2
        if callable(handler) and not hasattr(handler, "frameReceived"):
            handler = handler(sid)
        self.streams[sid] = handler
        self.pending_opens.add(sid)
        self.send_frame(F.DATA, F.SYN, sid, len(metadata), metadata)
        return sid

    def remove(self, sid):
        self.streams.pop(sid, None)
        self.pending_opens.discard(sid)
        if self._idle_waiters and not self.streams:
            self._idle()

    def whenIdle(self):
        """Deferred firing once no stream is left on the tunnel (or it has ended)."""
        if self.closed or not self.streams:
            return defer.succeed(None)
        d = defer.Deferred(self._idle_waiters.remove)
        self._idle_waiters.append(d)
        return d

    def _idle(self):
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    def reset_streams(self, code, reason):
        """Reset every stream of the tunnel now, telling the peer why."""
        for handler in list(self.streams.values()):
            handler.reset(code, reason)

    # -- drain and close ---------------------------------------------------

    def goAway(self, code=F.NORMAL):
        """Refuse new streams from now on and tell the peer so."""
        if self.local_goaway or self.closed:
            return
        self.local_goaway = True
        self.send_frame(F.GOAWAY, 0, 0, code)

    def fail(self, code, reason, abort=False):
        """Close the tunnel for a protocol violation or a fatal condition.

        ``abort`` drops the carrier at once (a dead peer): a graceful close
        would wait for the peer's answer, keeping the socket, and with it
        the dialer's reconnection, hanging for as long as the peer is gone.
        """
        if self.closed:
            return
        self.log.warn("tunnel {name} closed: {reason}", name=self.name, reason=reason)
        self.send_frame(F.GOAWAY, 0, 0, code)
        self._shutdown(code, reason)
        self._unpace()
        abort_carrier = getattr(self.transport, "abortConnection", None) if abort else None
        if abort_carrier is not None:
            abort_carrier()
        elif self._close_transport is not None:
            self._close_transport()

    def close(self, reason="closed"):
        """Close the carrier; streams are reset with TUNNEL_LOST."""
        if self.closed:
            return
        self._shutdown(F.TUNNEL_LOST, reason)
        self._unpace()
        if self._close_transport is not None:
            self._close_transport()

    def _shutdown(self, code, reason):
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        streams, self.streams = self.streams, {}
        self.pending_opens = set()
        for handler in streams.values():
            handler.tunnelLost(code, reason)
        if self.on_close is not None:
            self.on_close(self, code, reason)
        self._idle()

    # -- internals ---------------------------------------------------------

    def _incoming(self, ftype, flags, sid, value, payload):
        if (sid % 2 == 1) == self.dialer:
            self.fail(F.PROTOCOL_ERROR, "peer opened stream %d with our parity" % sid)
            return
        if sid in self.streams:
            self.fail(F.PROTOCOL_ERROR, "peer reopened live stream %d" % sid)
            return
        if self.local_goaway:
            self.send_reset(sid, F.GOING_AWAY, "tunnel %s is draining" % self.name)
            return
        if len(self.streams) >= self.limits.max_streams:
            self.send_reset(sid, F.LIMIT_EXCEEDED, "tunnel %s has reached its limit of %d streams"
                            % (self.name, self.limits.max_streams))
            return
        if self.on_open is None:
            self.send_reset(sid, F.REFUSED, "this side accepts no streams")
            return
        try:
            handler = self.on_open(self, sid, payload if ftype == F.DATA else b"")
        except RefuseStream as e:
            self.send_reset(sid, e.code, e.reason)
            return
        except Exception:
            self.log.failure("stream open handler failed on {name}", name=self.name)
            self.send_reset(sid, F.INTERNAL_ERROR, "internal error opening the stream")
            return
        if handler is not None:
            self.streams[sid] = handler

    def _ping(self, flags, value):
        if flags & F.SYN:
            self.send_frame(F.PING, F.ACK, 0, value)
        elif flags & F.ACK:
            sent = self._ping_sent.pop(value, None)
            if sent is not None:
                self.rtt = self.clock.seconds() - sent

    def _goaway_received(self, code):
        self.remote_goaway = True
        if self.on_goaway is not None:
            self.on_goaway(self, code)

    def ping(self):
        self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
        # Keep only recent outstanding pings so a silent peer costs nothing.
        if len(self._ping_sent) > 8:
            self._ping_sent.clear()
        self._ping_sent[self._ping_seq] = self.clock.seconds()
        self.send_frame(F.PING, F.SYN, 0, self._ping_seq)

    def _schedule(self, now):
        # Wake up for the next ping or for the moment the peer would have been
        # silent for dead_after, whichever comes first: detection happens
        # dead_after after the last byte, not up to a ping interval later.
        # Received bytes only move _last_rx; the timer is not touched per read.
        wake = min(self._next_ping, self._last_rx + self.limits.dead_after)
        self._timer = self.clock.callLater(max(0.0, wake - now), self._tick)

    def _tick(self):
        self._timer = None
        if self.closed:
            return
        now = self.clock.seconds()
        silent = now - self._last_rx
        # The small margin absorbs float rounding of the scheduled wake-up.
        if silent >= self.limits.dead_after - 0.001:
            self.fail(F.TUNNEL_LOST, "peer silent for %.1f s (limit %.0f s): tunnel is dead"
                      % (silent, self.limits.dead_after), abort=True)
            return
        if now >= self._next_ping - 0.001:
            self.ping()
            self._next_ping = now + self.limits.ping_interval
        self._schedule(now)


def drain(sessions, clock, timeout, reason, code=F.GOING_AWAY):
    """Let the streams of ``sessions`` finish, for at most ``timeout`` seconds.

    The caller has sent GOAWAY (no new streams come).  Streams still open at
    the deadline are reset with ``code`` and ``reason``.  The Deferred fires
    with the number of streams so reset (0: everything finished in time).
    """
    sessions = list(sessions)
    done = defer.Deferred()
    reset = []

    def finish(_=None):
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(len(reset))

    def deadline():
        for session in sessions:
            reset.extend(session.streams)
        for session in sessions:
            session.reset_streams(code, reason)
        finish()

    timer = clock.callLater(timeout, deadline)
    defer.gatherResults([s.whenIdle() for s in sessions]).addCallback(finish)
    return done

"""Tests for arc.tunnel.session: two sessions back to back, in memory, on a Clock."""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from arc.tunnel import frames as F
from arc.tunnel.session import Limits, RefuseStream, Session, drain
from arc.tunnel.stream import Stream, StreamReset

# -- helpers shared with test_stream and test_splice ---------------------------------


class Link:
    """A carrier between two sessions: what one sends is queued for the other.

    Nothing is delivered until :meth:`pump` (or :meth:`deliver`), so no
    session is ever re-entered from inside its own ``send``.  Closing the
    carrier from either side delivers what was already sent, then tells the
    other side the connection is lost.
    """

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.queues = {a: [], b: []}       # bytes sent BY the key, not yet delivered
        self.muted = set()                 # sessions whose output is dropped
        self.closed_by = None
        self.lost = False
        self.frames = {a: F.FrameDecoder(1 << 24), b: F.FrameDecoder(1 << 24)}
        self.sent = {a: [], b: []}         # decoded copy of everything each side sent
        for s in (a, b):
            s.connected(self._sender(s), self._closer(s))

    def _sender(self, s):
        def send(chunks):
            data = b"".join(chunks)
            if self.frames[s] is not None:
                try:
                    self.sent[s].extend(self.frames[s].feed(data))
                except F.ProtocolError:
                    self.frames[s] = None       # a test sending junk on purpose
            if s not in self.muted and not self.lost:
                self.queues[s].append(data)
        return send

    def _closer(self, s):
        def close():
            if self.closed_by is None:
                self.closed_by = s
        return close

    def peer(self, s):
        return self.b if s is self.a else self.a

    def deliver(self, s):
        """Deliver what ``s`` sent so far to its peer; True if anything moved."""
        queue = self.queues[s]
        if not queue or self.lost:
            return False
        data = b"".join(queue)
        del queue[:]
        self.peer(s).dataReceived(data)
        return True

    def pump(self):
        for _ in range(100000):
            moved = self.deliver(self.a) | self.deliver(self.b)
            if not moved:
                break
        else:  # pragma: no cover
            raise AssertionError("the sessions never went quiet")
        if self.closed_by is not None and not self.lost:
            self.lost = True
            self.peer(self.closed_by).connectionLost("carrier closed by the peer")
            self.closed_by.connectionLost("carrier closed")

    def sent_types(self, s, ftype, flags=None):
        return [f for f in self.sent[s]
                if f[0] == ftype and (flags is None or f[1] & flags == flags)]


class PlainRecorder(Protocol):
    """A protocol that records what its stream delivers (no half-close)."""

    def __init__(self):
        self.data = bytearray()
        self.eof = False
        self.eof_at = None
        self.lost = None

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.eof = True
        self.eof_at = len(self.data)

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class Recorder(PlainRecorder):
    """A half-closeable PlainRecorder: a FIN calls readConnectionLost."""


class Acceptor:
    """``on_open`` for the accepting side: Streams running Recorders."""

    def __init__(self, protocol=Recorder, refuse=None, window=F.INITIAL_WINDOW):
        self.protocol = protocol
        self.refuse = refuse
        self.window = window
        self.opened = []       # (stream, protocol, metadata)

    def __call__(self, session, sid, metadata):
        if self.refuse is not None:
            raise self.refuse
        stream = Stream(session, metadata, window=self.window)
        stream.accept(sid)
        proto = self.protocol()
        stream.attach(proto)
        self.opened.append((stream, proto, metadata))
        return stream


# The protocol's own initial window, so that flow-control tests count in it.
SMALL_WINDOW = Limits(stream_window=F.INITIAL_WINDOW)


class Pair:
    """A dialer and an acceptor session on one Link, sharing one Clock."""

    def __init__(self, limits=SMALL_WINDOW, acceptor_limits=None, on_open=None,
                 dialer_on_open=None):
        self.clock = Clock()
        self.closes = []
        self.goaways = []
        self.on_open = on_open if on_open is not None else Acceptor()
        self.dialer = Session(dialer=True, clock=self.clock, limits=limits, name="dialer",
                              on_open=dialer_on_open, on_goaway=self._goaway,
                              on_close=self._closed)
        self.acceptor = Session(dialer=False, clock=self.clock, name="acceptor",
                                limits=acceptor_limits or limits, on_open=self.on_open,
                                on_goaway=self._goaway, on_close=self._closed)
        self.link = Link(self.dialer, self.acceptor)

    def _goaway(self, session, code):
        self.goaways.append((session.name, code))

    def _closed(self, session, code, reason):
        self.closes.append((session.name, code, reason))

    def open(self, metadata=b"meta", protocol=Recorder, session=None, pump=True):
        """Open a stream from the dialer (or ``session``); returns (stream, protocol)."""
        session = session or self.dialer
        stream = Stream(session, metadata)
        sid = session.open(stream, metadata)
        stream.opened(sid, session.limits.open_timeout)
        proto = protocol()
        stream.attach(proto)
        if pump:
            self.link.pump()
        return stream, proto

    def pump(self):
        self.link.pump()


# -- tests ------------------------------------------------------------------------


class OpenTests(unittest.TestCase):
    def test_ids_by_parity(self):
        p = Pair(dialer_on_open=Acceptor())
        ids = [p.open(pump=False)[0].id for _ in range(3)]
        self.assertEqual(ids, [1, 3, 5])
        ids = [p.open(session=p.acceptor, pump=False)[0].id for _ in range(3)]
        self.assertEqual(ids, [2, 4, 6])
        p.pump()
        self.assertEqual(sorted(p.dialer.streams), [1, 2, 3, 4, 5, 6])
        self.assertEqual(sorted(p.acceptor.streams), [1, 2, 3, 4, 5, 6])
        self.assertEqual(len(p.on_open.opened), 3)
        self.assertEqual(len(p.dialer.on_open.opened), 3)

    def test_open_ack_and_data_both_ways(self):
        p = Pair()
        stream, proto = p.open(b'{"cluster": "c1"}', pump=False)
        self.assertFalse(stream.acked)
        stream.write(b"hello")
        p.pump()
        self.assertTrue(stream.acked)
        [(remote, rproto, metadata)] = p.on_open.opened
        self.assertEqual(metadata, b'{"cluster": "c1"}')
        self.assertEqual(remote.metadata, b'{"cluster": "c1"}')
        self.assertEqual(remote.id, stream.id)
        self.assertEqual(bytes(rproto.data), b"hello")
        remote.write(b"world")
        p.pump()
        self.assertEqual(bytes(proto.data), b"world")
        self.assertEqual((stream.bytes_out, stream.bytes_in), (5, 5))
        self.assertGreater(p.dialer.bytes_out, 5)
        self.assertEqual(p.dialer.bytes_out, p.acceptor.bytes_in)
        self.assertEqual(p.acceptor.bytes_out, p.dialer.bytes_in)
        # The open is one DATA|SYN carrying the metadata, the ACK one WINDOW_UPDATE|ACK.
        [syn] = p.link.sent_types(p.dialer, F.DATA, F.SYN)
        self.assertEqual(syn[4], b'{"cluster": "c1"}')
        [ack] = p.link.sent_types(p.acceptor, F.WINDOW_UPDATE, F.ACK)
        self.assertEqual(ack[:4], (F.WINDOW_UPDATE, F.ACK, stream.id, 0))

    def test_refused_by_on_open(self):
        p = Pair(on_open=Acceptor(refuse=RefuseStream(F.FORBIDDEN, "not for you")))
        stream, proto = p.open()
        self.assertIsInstance(proto.lost.value, StreamReset)
        self.assertEqual(proto.lost.value.code, F.FORBIDDEN)
        self.assertEqual(proto.lost.value.reason, "not for you")
        self.assertEqual(p.dialer.streams, {})
        self.assertEqual(p.acceptor.streams, {})
        self.assertFalse(p.dialer.closed)

    def test_on_open_failure_is_internal_error(self):
        def broken(session, sid, metadata):
            raise RuntimeError("bug")

        p = Pair(on_open=broken)
        stream, proto = p.open()
        self.assertEqual(proto.lost.value.code, F.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(p.acceptor.closed)

    def test_no_on_open_refuses(self):
        p = Pair()
        stream, proto = p.open(session=p.acceptor)
        self.assertEqual(proto.lost.value.code, F.REFUSED)

    def test_on_open_may_return_none(self):
        p = Pair(on_open=lambda session, sid, metadata: None)
        stream, proto = p.open()
        self.assertIsNone(proto.lost)
        self.assertEqual(p.acceptor.streams, {})

    def test_open_with_callable_handler(self):
        p = Pair()
        made = []

        def make(sid):
            stream = Stream(p.dialer)
            stream.opened(sid)
            made.append(stream)
            return stream

        sid = p.dialer.open(make, b"m")
        self.assertEqual(made[0].id, sid)
        self.assertIs(p.dialer.streams[sid], made[0])

    def test_max_streams_local(self):
        p = Pair(limits=Limits(max_streams=2))
        p.open()
        p.open()
        e = self.assertRaises(RefuseStream, p.dialer.open, Stream(p.dialer), b"")
        self.assertEqual(e.code, F.LIMIT_EXCEEDED)
        self.assertIn("limit of 2 streams", e.reason)

    def test_max_streams_remote(self):
        p = Pair(limits=Limits(max_streams=10), acceptor_limits=Limits(max_streams=2))
        p.open()
        p.open()
        stream, proto = p.open()
        self.assertEqual(proto.lost.value.code, F.LIMIT_EXCEEDED)
        self.assertEqual(len(p.acceptor.streams), 2)
        self.assertFalse(p.acceptor.closed)
        # Once a stream ends, there is room again.
        first = p.on_open.opened[0][0]
        first.reset(F.CANCELLED, "done")
        p.pump()
        stream, proto = p.open()
        self.assertIsNone(proto.lost)
        self.assertEqual(len(p.acceptor.streams), 2)

    def test_parity_violation_closes_tunnel(self):
        p = Pair()
        live, proto = p.open()
        p.dialer.send_frame(F.DATA, F.SYN, 2, 0)
        p.pump()
        self.assertTrue(p.acceptor.closed)
        self.assertTrue(p.dialer.closed)
        name, code, reason = p.closes[0]
        self.assertEqual((name, code), ("acceptor", F.PROTOCOL_ERROR))
        self.assertIn("parity", reason)
        # The peer was told why before the carrier closed.
        self.assertIn(("dialer", F.PROTOCOL_ERROR), p.goaways)
        self.assertEqual(proto.lost.value.code, F.TUNNEL_LOST)
        self.assertEqual(p.on_open.opened[0][1].lost.value.code, F.PROTOCOL_ERROR)

    def test_nothing_processed_after_violation(self):
        # Frames after the violation, even in the same read, are not acted on.
        p = Pair()
        live, proto = p.open()
        p.dialer.send_frame(F.DATA, F.SYN, 2, 0)
        p.dialer.send_frame(F.DATA, F.SYN, 101, 1, b"x")
        p.dialer.send_frame(F.DATA, 0, live.id, 4, b"late")
        p.pump()
        self.assertTrue(p.acceptor.closed)
        self.assertEqual(len(p.on_open.opened), 1)
        self.assertEqual(p.acceptor.streams, {})
        rproto = p.on_open.opened[0][1]
        self.assertEqual(bytes(rproto.data), b"")
        self.assertEqual(rproto.lost.value.code, F.PROTOCOL_ERROR)

    def test_reopen_of_live_stream_closes_tunnel(self):
        p = Pair()
        stream, proto = p.open()
        p.dialer.send_frame(F.DATA, F.SYN, stream.id, 0)
        p.pump()
        self.assertEqual(p.closes[0][:2], ("acceptor", F.PROTOCOL_ERROR))
        self.assertIn("reopened", p.closes[0][2])

    def test_malformed_frame_closes_tunnel(self):
        p = Pair()
        stream, proto = p.open()
        p.dialer.send([b"\x07" + b"\x00" * 11])
        p.pump()
        self.assertEqual(p.closes[0][:2], ("acceptor", F.PROTOCOL_ERROR))
        self.assertIn("version 7", p.acceptor.close_reason)
        self.assertEqual(proto.lost.value.code, F.TUNNEL_LOST)

    def test_frames_for_unknown_streams_are_dropped(self):
        p = Pair()
        p.dialer.send_frame(F.DATA, 0, 99, 3, b"abc")
        p.dialer.send_frame(F.WINDOW_UPDATE, 0, 99, 100)
        p.pump()
        self.assertFalse(p.acceptor.closed)
        stream, proto = p.open()
        self.assertIsNone(proto.lost)


class CloseTests(unittest.TestCase):
    def test_carrier_loss_resets_every_stream(self):
        p = Pair()
        streams = [p.open() for _ in range(3)]
        p.dialer.connectionLost("network gone")
        for stream, proto in streams:
            self.assertEqual(proto.lost.value.code, F.TUNNEL_LOST)
            self.assertEqual(proto.lost.value.reason, "network gone")
        self.assertEqual(p.dialer.streams, {})
        self.assertEqual(p.closes, [("dialer", F.TUNNEL_LOST, "network gone")])
        # Idempotent, and a closed session neither sends nor opens.
        p.dialer.connectionLost("again")
        self.assertEqual(len(p.closes), 1)
        self.assertFalse(p.dialer.can_open())
        e = self.assertRaises(RefuseStream, p.dialer.open, Stream(p.dialer))
        self.assertEqual(e.code, F.GOING_AWAY)

    def test_close_closes_carrier(self):
        p = Pair()
        stream, proto = p.open()
        p.dialer.close("shutting down")
        self.assertIs(p.link.closed_by, p.dialer)
        p.pump()
        self.assertEqual(proto.lost.value.code, F.TUNNEL_LOST)
        self.assertEqual(p.on_open.opened[0][1].lost.value.code, F.TUNNEL_LOST)
        self.assertEqual([c[0] for c in p.closes], ["dialer", "acceptor"])

    def test_data_after_close_ignored(self):
        p = Pair()
        p.acceptor.close()
        p.acceptor.dataReceived(b"\xff" * 20)
        self.assertEqual(len(p.closes), 1)


class KeepaliveTests(unittest.TestCase):
    def test_pings_every_interval_and_rtt(self):
        p = Pair(limits=Limits(ping_interval=15, dead_after=45))
        p.clock.advance(14.9)
        self.assertEqual(p.link.sent_types(p.dialer, F.PING), [])
        p.clock.advance(0.1)
        [ping] = p.link.sent_types(p.dialer, F.PING)
        self.assertEqual(ping[:3], (F.PING, F.SYN, 0))
        # Both sides ping.
        self.assertEqual(len(p.link.sent_types(p.acceptor, F.PING, F.SYN)), 1)
        p.link.deliver(p.dialer)
        [pong] = p.link.sent_types(p.acceptor, F.PING, F.ACK)
        self.assertEqual(pong[3], ping[3])
        p.clock.advance(0.25)
        p.link.deliver(p.acceptor)
        self.assertAlmostEqual(p.dialer.rtt, 0.25)
        p.link.deliver(p.dialer)
        self.assertEqual(p.acceptor.rtt, 0.25)
        for _ in range(10):
            p.clock.advance(15)
            p.pump()
        self.assertEqual(len(p.link.sent_types(p.dialer, F.PING, F.SYN)), 11)
        self.assertEqual(len(p.link.sent_types(p.acceptor, F.PING, F.ACK)), 11)
        self.assertFalse(p.dialer.closed)
        self.assertFalse(p.acceptor.closed)
        self.assertEqual(p.dialer.rtt, 0)

    def test_unanswered_pings_do_not_pile_up(self):
        p = Pair(limits=Limits(ping_interval=1, dead_after=1000))
        p.link.muted.add(p.acceptor)
        for _ in range(50):
            p.clock.advance(1)
            p.link.pump()
        self.assertLessEqual(len(p.dialer._ping_sent), 9)

    def test_unknown_pong_ignored(self):
        p = Pair()
        p.acceptor.send_frame(F.PING, F.ACK, 0, 12345)
        p.pump()
        self.assertIsNone(p.dialer.rtt)
        self.assertFalse(p.dialer.closed)

    def test_silent_peer_is_dead(self):
        p = Pair(limits=Limits(ping_interval=15, dead_after=45, open_timeout=120))
        streams = [p.open() for _ in range(2)]
        pending = p.open(pump=False)      # an open still waiting for its ACK
        p.link.muted.add(p.acceptor)
        start = p.clock.seconds()
        while not p.dialer.closed:
            p.clock.advance(1)
            p.link.deliver(p.dialer)
            self.assertLess(p.clock.seconds() - start, 45 + 15 + 1)
        self.assertGreaterEqual(p.clock.seconds() - start, 45)
        self.assertEqual(p.closes[0][:2], ("dialer", F.TUNNEL_LOST))
        self.assertIn("silent", p.closes[0][2])
        for stream, proto in streams + [pending]:
            self.assertIsInstance(proto.lost.value, StreamReset)
            self.assertEqual(proto.lost.value.code, F.TUNNEL_LOST)
        self.assertEqual(p.dialer.streams, {})
        self.assertIs(p.link.closed_by, p.dialer)
        # The dead session left no timer behind.
        self.assertIsNone(p.dialer._timer)

    def test_dead_detected_at_dead_after_not_a_ping_later(self):
        # ping_interval 10, dead_after 25: the last byte arrives between two
        # ticks, and detection comes 25 s after it, not at the next tick.
        p = Pair(limits=Limits(ping_interval=10, dead_after=25))
        p.clock.advance(3)
        p.acceptor.ping()
        p.pump()
        last = p.clock.seconds()
        p.link.muted.add(p.acceptor)
        while not p.dialer.closed:
            p.clock.advance(0.05)
            p.link.deliver(p.dialer)
            self.assertLess(p.clock.seconds() - last, 25.2)
        self.assertGreaterEqual(p.clock.seconds() - last, 25 - 0.01)
        # Pings kept their own pace meanwhile: one every 10 s.
        pings = p.link.sent_types(p.dialer, F.PING, F.SYN)
        self.assertEqual(len(pings), 2)

    def test_dead_peer_carrier_is_aborted(self):
        # A graceful close of a TLS carrier waits for the (dead) peer's
        # answer; a dead tunnel must drop its connection at once.
        class Transport:
            aborted = False

            def abortConnection(self):
                self.aborted = True

        p = Pair(limits=Limits(ping_interval=1, dead_after=3))
        p.dialer.transport = transport = Transport()
        p.link.muted.add(p.acceptor)
        p.clock.advance(3)
        self.assertTrue(p.dialer.closed)
        self.assertTrue(transport.aborted)
        self.assertIsNot(p.link.closed_by, p.dialer)

    def test_any_inbound_traffic_keeps_alive(self):
        p = Pair(limits=Limits(ping_interval=15, dead_after=45))
        p.link.muted.add(p.acceptor)
        for _ in range(5):
            p.clock.advance(15)
            p.link.muted.discard(p.acceptor)
            p.acceptor.ping()
            p.link.pump()
            p.link.muted.add(p.acceptor)
        self.assertFalse(p.dialer.closed)

    def test_no_timer_without_ping_interval(self):
        p = Pair(limits=Limits(ping_interval=0))
        self.assertEqual(p.clock.getDelayedCalls(), [])

    def test_close_cancels_timer(self):
        p = Pair()
        p.dialer.close()
        p.acceptor.close()
        self.assertEqual(p.clock.getDelayedCalls(), [])


class GoAwayTests(unittest.TestCase):
    def test_local_goaway_refuses_new_keeps_old(self):
        p = Pair()
        stream, proto = p.open()
        p.acceptor.goAway(F.GOING_AWAY)
        p.acceptor.goAway(F.GOING_AWAY)       # idempotent
        self.assertFalse(p.acceptor.can_open())
        # An open that crossed the GOAWAY on the wire is refused.
        late, late_proto = p.open(pump=False)
        p.pump()
        self.assertEqual(p.goaways, [("dialer", F.GOING_AWAY)])
        self.assertEqual(len(p.link.sent_types(p.acceptor, F.GOAWAY)), 1)
        self.assertFalse(p.dialer.can_open())
        self.assertEqual(late_proto.lost.value.code, F.GOING_AWAY)
        self.assertIn("draining", late_proto.lost.value.reason)
        self.assertEqual(len(p.on_open.opened), 1)
        # The running stream still works both ways.
        stream.write(b"ping")
        p.pump()
        remote, rproto, _ = p.on_open.opened[0]
        self.assertEqual(bytes(rproto.data), b"ping")
        remote.write(b"pong")
        p.pump()
        self.assertEqual(bytes(proto.data), b"pong")
        self.assertFalse(p.dialer.closed or p.acceptor.closed)

    def test_remote_goaway_stops_local_opens(self):
        p = Pair()
        self.assertTrue(p.dialer.can_open())
        p.acceptor.goAway()
        p.pump()
        self.assertTrue(p.dialer.remote_goaway)
        self.assertFalse(p.dialer.can_open())
        e = self.assertRaises(RefuseStream, p.dialer.open, Stream(p.dialer))
        self.assertEqual(e.code, F.GOING_AWAY)

    def test_goaway_after_close_sends_nothing(self):
        p = Pair()
        p.dialer.close()
        p.dialer.goAway()
        self.assertEqual(p.link.sent_types(p.dialer, F.GOAWAY), [])


class DrainTests(unittest.TestCase):
    def test_drain_waits_for_running_streams(self):
        p = Pair(limits=Limits(ping_interval=0))
        a, aproto = p.open()
        b, bproto = p.open()
        p.dialer.goAway()
        results = []
        drain([p.dialer], p.clock, 30, "stopping").addCallback(results.append)
        p.pump()
        p.clock.advance(10)
        self.assertEqual(results, [])
        a.loseConnection()
        p.on_open.opened[0][0].loseConnection()
        p.pump()
        self.assertEqual(results, [])
        b.loseConnection()
        p.on_open.opened[1][0].loseConnection()
        p.pump()
        self.assertEqual(results, [0])
        self.assertNotIsInstance(bproto.lost.value, StreamReset)
        self.assertEqual(p.clock.getDelayedCalls(), [])

    def test_drain_deadline_resets_what_is_left(self):
        p = Pair(limits=Limits(ping_interval=0))
        stream, proto = p.open()
        p.dialer.goAway()
        results = []
        drain([p.dialer], p.clock, 30, "agent stopping: drain deadline passed").addCallback(
            results.append)
        p.clock.advance(29.9)
        self.assertEqual(results, [])
        p.clock.advance(0.1)
        self.assertEqual(results, [1])
        self.assertEqual(proto.lost.value.code, F.GOING_AWAY)
        p.pump()
        remote_proto = p.on_open.opened[0][1]
        self.assertEqual(remote_proto.lost.value.code, F.GOING_AWAY)
        self.assertIn("drain deadline", remote_proto.lost.value.reason)
        self.assertEqual(p.dialer.streams, {})
        self.assertEqual(p.acceptor.streams, {})

    def test_drain_of_idle_or_closed_sessions_is_immediate(self):
        p = Pair(limits=Limits(ping_interval=0))
        results = []
        drain([p.dialer], p.clock, 30, "x").addCallback(results.append)
        self.assertEqual(results, [0])
        p.open()
        p.dialer.close()
        drain([p.dialer], p.clock, 30, "x").addCallback(results.append)
        self.assertEqual(results, [0, 0])
        self.assertEqual(p.clock.getDelayedCalls(), [])

    def test_tunnel_loss_ends_the_drain(self):
        p = Pair(limits=Limits(ping_interval=0))
        p.open()
        results = []
        drain([p.dialer], p.clock, 30, "x").addCallback(results.append)
        p.dialer.connectionLost("gone")
        self.assertEqual(results, [0])


class SendTests(unittest.TestCase):
    def test_nothing_sent_before_connected(self):
        clock = Clock()
        session = Session(dialer=True, clock=clock)
        session.send_frame(F.PING, F.SYN, 0, 1)
        self.assertEqual(session.bytes_out, 0)

    def test_reset_frame(self):
        p = Pair()
        p.dialer.send_reset(7, F.TIMEOUT, "slow")
        [frame] = p.link.sent[p.dialer]
        self.assertEqual(frame[:3], (F.DATA, F.RST, 7))
        self.assertEqual(F.parse_rst(frame[4]), (F.TIMEOUT, "slow"))


class FakeCarrier:
    """A carrier that holds what it is given until told it has sent it."""

    def __init__(self):
        self.waiting = []       # byte strings written, not yet "sent"
        self.sent = []          # decoded frames, in the order they left
        self.drained = None
        self.decoder = F.FrameDecoder(1 << 24)

    def send(self, chunks):
        self.waiting.append(b"".join(bytes(c) for c in chunks))

    def buffered_bytes(self):
        return sum(len(d) for d in self.waiting)

    def drain(self):
        """The socket took everything: as the TLS transport does, say so."""
        while self.waiting:
            data = self.waiting.pop(0)
            self.sent.extend(self.decoder.feed(data))
            if not self.waiting and self.drained is not None:
                self.drained()

    def close(self):
        pass


class BulkPacingTests(unittest.TestCase):
    """Frames of streams past their first BULK_AFTER bytes wait in the session
    while the carrier holds CARRIER_BUFFER bytes; everything else goes on."""

    def setUp(self):
        from arc.tunnel import session as S
        self.S = S
        self.session = Session(dialer=True, clock=Clock(), limits=Limits(ping_interval=0))
        self.carrier = FakeCarrier()
        self.session.connected(self.carrier.send, self.carrier.close)
        self.session.transport = self.carrier
        self.session.pace(self.carrier)

    def data(self, sid, payload, bulk, flags=0):
        self.session.send([F.header(F.DATA, flags, sid, len(payload)), payload], bulk)

    def test_small_frames_overtake_held_bulk(self):
        big = b"b" * self.S.CARRIER_BUFFER
        self.data(1, big, bulk=True)            # fills the carrier
        self.data(1, b"more", bulk=True)        # held
        self.data(1, b"", bulk=True, flags=F.FIN)   # held behind it
        self.data(3, b"small answer", bulk=False)
        self.session.send_frame(F.WINDOW_UPDATE, 0, 5, 1000)
        self.assertEqual(self.session.held, 2 * F.HEADER_SIZE + 4)
        self.carrier.drain()
        order = [(sid, flags, payload) for _, flags, sid, _, payload in self.carrier.sent]
        self.assertEqual(order, [(1, 0, big), (3, 0, b"small answer"), (5, 0, b""),
                                 (1, 0, b"more"), (1, F.FIN, b"")])
        self.assertEqual(self.session.held, 0)

    def test_bulk_goes_straight_on_while_the_carrier_is_nearly_empty(self):
        self.data(1, b"x" * 1000, bulk=True)
        self.assertEqual(self.session.held, 0)
        self.assertEqual(len(self.carrier.waiting), 1)

    def test_held_frames_leave_in_order_as_the_carrier_drains(self):
        chunk = b"c" * (self.S.CARRIER_BUFFER // 2)
        for n in range(8):
            self.data(1, bytes([n]) * len(chunk), bulk=True)
        self.assertGreater(self.session.held, 0)
        self.carrier.drain()
        self.assertEqual([p[:1] for _, _, _, _, p in self.carrier.sent],
                         [bytes([n]) for n in range(8)])

    def test_bytes_out_counts_held_frames_when_they_leave(self):
        self.data(1, b"b" * self.S.CARRIER_BUFFER, bulk=True)
        before = self.session.bytes_out
        self.data(1, b"held", bulk=True)
        self.assertEqual(self.session.bytes_out, before)
        self.carrier.drain()
        self.assertEqual(self.session.bytes_out, before + F.HEADER_SIZE + 4)

    def test_closing_drops_held_frames_and_unhooks(self):
        self.data(1, b"b" * self.S.CARRIER_BUFFER, bulk=True)
        self.data(1, b"held", bulk=True)
        self.session.close("bye")
        self.assertEqual(self.session.held, 0)
        self.assertIsNone(self.carrier.drained)


class StreamBulkTests(unittest.TestCase):
    def test_a_stream_turns_bulk_after_its_first_bytes_and_its_fin_follows_its_data(self):
        from arc.tunnel import session as S
        session = Session(dialer=True, clock=Clock(), limits=Limits(ping_interval=0))
        carrier = FakeCarrier()
        session.connected(carrier.send, carrier.close)
        session.transport = carrier
        session.pace(carrier)
        stream = Stream(session)
        stream.opened(session.open(stream))
        stream._send_window = 10 * S.BULK_AFTER      # as if the peer had granted credit
        stream.write(b"a" * S.BULK_AFTER)           # the first bytes: not bulk
        other = Stream(session)
        other.opened(session.open(other))
        stream.write(b"b" * S.CARRIER_BUFFER)       # bulk now, and the carrier is full
        stream.write(b"tail")
        stream.loseConnection()
        other.write(b"quick")
        self.assertGreater(session.held, 0)
        carrier.drain()
        mine = [(flags, payload[:1]) for ftype, flags, sid, _, payload in carrier.sent
                if ftype == F.DATA and sid == stream.id and not flags & F.SYN]
        self.assertEqual(mine, [(0, b"a"), (0, b"b"), (0, b"t"), (F.FIN, b"")])
        sids = [sid for ftype, flags, sid, _, payload in carrier.sent
                if ftype == F.DATA and payload in (b"quick", b"tail")]
        self.assertEqual(sids, [other.id, stream.id])

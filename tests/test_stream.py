"""Tests for arc.tunnel.stream: a stream as a Twisted transport, with credit."""

from twisted.internet import error
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from arc.tunnel import frames as F
from arc.tunnel.session import Limits
from arc.tunnel.stream import Stream, StreamReset
from tests.test_session import Acceptor, Pair, PlainRecorder, Recorder

W = F.INITIAL_WINDOW
MB = 1024 * 1024


@implementer(IPushProducer)
class Source:
    """A push producer that records how its consumer drives it."""

    def __init__(self):
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.stopped = False

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False
        self.resumes += 1

    def stopProducing(self):
        self.stopped = True


class Base(unittest.TestCase):
    def setUp(self):
        self.p = Pair()

    def open(self, **kw):
        """Open a stream; returns (local stream, local proto, remote stream, remote proto)."""
        stream, proto = self.p.open(**kw)
        remote, rproto, _ = self.p.on_open.opened[-1]
        return stream, proto, remote, rproto


class TransportTests(Base):
    def test_interfaces(self):
        stream, proto, remote, rproto = self.open()
        for iface in (ITransport, IPushProducer, IConsumer):
            self.assertTrue(verifyObject(iface, stream))
        self.assertIs(proto.transport, stream)
        self.assertEqual(stream.getPeer().stream_id, stream.id)
        self.assertEqual(stream.getHost().tunnel, "dialer")
        self.assertIn("dialer", repr(stream.getPeer()))

    def test_write_sequence_and_empty_writes(self):
        stream, proto, remote, rproto = self.open()
        stream.writeSequence([b"a", b"b", b"c"])
        stream.write(b"")
        self.p.pump()
        self.assertEqual(bytes(rproto.data), b"abc")
        self.assertEqual(len(self.p.link.sent_types(self.p.dialer, F.DATA)), 2)  # SYN + one

    def test_large_write_split_into_max_frame(self):
        self.p = p = Pair(limits=Limits(max_frame=1000))
        stream, proto, remote, rproto = self.open()
        stream.write(b"z" * 2500)
        p.pump()
        sizes = [f[3] for f in p.link.sent_types(p.dialer, F.DATA) if not f[1] & F.SYN]
        self.assertEqual(sizes, [1000, 1000, 500])
        self.assertEqual(bytes(rproto.data), b"z" * 2500)

    def test_memoryview_write(self):
        stream, proto, remote, rproto = self.open()
        stream.write(memoryview(b"0123456789")[2:6])
        self.p.pump()
        self.assertEqual(bytes(rproto.data), b"2345")


class AttachTests(Base):
    def test_data_and_fin_before_attach(self):
        held = []

        def on_open(session, sid, metadata):
            stream = Stream(session, metadata)
            stream.accept(sid)
            held.append(stream)
            return stream

        p = self.p = Pair(on_open=on_open)
        stream, proto = p.open()
        stream.write(b"early ")
        stream.write(b"bytes")
        stream.loseConnection()
        p.pump()
        [remote] = held
        late = Recorder()
        remote.attach(late)
        self.assertIs(late.transport, remote)
        self.assertEqual(bytes(late.data), b"early bytes")
        self.assertTrue(late.eof)
        self.assertEqual(late.eof_at, len(b"early bytes"))
        self.assertIsNone(late.lost)
        remote.write(b"answer")
        remote.loseConnection()
        p.pump()
        self.assertEqual(bytes(proto.data), b"answer")
        self.assertTrue(late.lost.check(error.ConnectionDone))
        self.assertTrue(proto.lost.check(error.ConnectionDone))

    def test_reset_before_attach(self):
        held = []

        def on_open(session, sid, metadata):
            stream = Stream(session, metadata)
            stream.accept(sid)
            held.append(stream)
            return stream

        p = self.p = Pair(on_open=on_open)
        stream, proto = p.open()
        stream.write(b"data")
        stream.reset(F.CANCELLED, "changed my mind")
        p.pump()
        [remote] = held
        late = Recorder()
        remote.attach(late)
        self.assertIsInstance(late.lost.value, StreamReset)
        self.assertEqual(late.lost.value.code, F.CANCELLED)
        self.assertEqual(late.lost.value.reason, "changed my mind")


class HalfCloseTests(Base):
    def test_fin_one_way_other_keeps_working(self):
        stream, proto, remote, rproto = self.open()
        stream.write(b"request")
        stream.loseConnection()
        self.assertTrue(stream.disconnecting)
        stream.write(b"ignored after close")
        self.p.pump()
        self.assertTrue(rproto.eof)
        self.assertEqual(bytes(rproto.data), b"request")
        self.assertIsNone(rproto.lost)
        self.assertIsNone(proto.lost)
        # The other direction is still open.
        for i in range(3):
            remote.write(b"part%d " % i)
            self.p.pump()
        self.assertEqual(bytes(proto.data), b"part0 part1 part2 ")
        self.assertFalse(proto.eof)
        remote.loseConnection()
        self.p.pump()
        self.assertTrue(proto.eof)
        self.assertTrue(proto.lost.check(error.ConnectionDone))
        self.assertTrue(rproto.lost.check(error.ConnectionDone))
        self.assertEqual(self.p.dialer.streams, {})
        self.assertEqual(self.p.acceptor.streams, {})
        self.assertEqual(len(self.p.link.sent_types(self.p.dialer, F.DATA, F.FIN)), 1)
        self.assertEqual(len(self.p.link.sent_types(self.p.acceptor, F.DATA, F.FIN)), 1)

    def test_plain_protocol_closes_on_fin(self):
        # A protocol without IHalfCloseableProtocol ends when the peer finishes.
        self.p = Pair(on_open=Acceptor(protocol=PlainRecorder))
        stream, proto, remote, rproto = self.open()
        stream.write(b"bye")
        stream.loseConnection()
        self.p.pump()
        self.assertEqual(bytes(rproto.data), b"bye")
        self.assertFalse(rproto.eof)
        self.assertTrue(rproto.lost.check(error.ConnectionDone))
        self.assertTrue(proto.eof)
        self.assertTrue(proto.lost.check(error.ConnectionDone))
        self.assertEqual(self.p.acceptor.streams, {})

    def test_plain_protocol_flushes_before_closing(self):
        # Its own pending data goes out before its FIN.
        self.p = Pair(on_open=Acceptor(protocol=PlainRecorder))
        stream, proto, remote, rproto = self.open()
        stream.pauseProducing()
        remote.write(b"r" * (W + 1000))
        self.assertEqual(remote.buffered, 1000)
        stream.loseConnection()
        self.p.pump()
        self.assertIsNone(rproto.lost)
        stream.resumeProducing()
        self.p.pump()
        self.assertEqual(len(proto.data), W + 1000)
        self.assertEqual(proto.eof_at, W + 1000)
        self.assertTrue(rproto.lost.check(error.ConnectionDone))
        self.assertTrue(proto.lost.check(error.ConnectionDone))

    def test_close_queued_behind_pending_data(self):
        stream, proto, remote, rproto = self.open()
        payload = bytes(range(256)) * (4 * 1024)     # 1 MiB, four windows
        stream.write(payload)
        stream.loseConnection()
        self.assertGreater(stream.buffered, 0)
        self.assertEqual(self.p.link.sent_types(self.p.dialer, F.DATA, F.FIN), [])
        self.p.pump()
        self.assertEqual(rproto.eof_at, len(payload))
        self.assertEqual(bytes(rproto.data), payload)
        self.assertEqual(stream.buffered, 0)
        remote.loseConnection()
        self.p.pump()
        self.assertTrue(proto.lost.check(error.ConnectionDone))

    def test_lose_connection_twice(self):
        stream, proto, remote, rproto = self.open()
        stream.loseConnection()
        stream.loseConnection()
        stream.loseWriteConnection()
        self.p.pump()
        self.assertEqual(len(self.p.link.sent_types(self.p.dialer, F.DATA, F.FIN)), 1)
        self.assertTrue(rproto.eof)


class ResetTests(Base):
    def test_reset_reaches_peer_with_code_and_reason(self):
        stream, proto, remote, rproto = self.open()
        stream.reset(F.UPSTREAM_UNREACHABLE, "API server 10.0.0.1:6443 refused the connection")
        self.assertIsInstance(proto.lost.value, StreamReset)
        self.assertEqual(proto.lost.value.code, F.UPSTREAM_UNREACHABLE)
        self.p.pump()
        exc = rproto.lost.value
        self.assertIsInstance(exc, StreamReset)
        self.assertIsInstance(exc, error.ConnectionLost)
        self.assertEqual(exc.code, F.UPSTREAM_UNREACHABLE)
        self.assertEqual(exc.reason, "API server 10.0.0.1:6443 refused the connection")
        self.assertEqual(str(exc), "UPSTREAM_UNREACHABLE: API server 10.0.0.1:6443 refused "
                                   "the connection")
        self.assertEqual(self.p.dialer.streams, {})
        self.assertEqual(self.p.acceptor.streams, {})

    def test_reset_is_final(self):
        stream, proto, remote, rproto = self.open()
        remote.reset(F.CANCELLED, "x")
        remote.reset(F.INTERNAL_ERROR, "y")
        remote.write(b"dropped")
        self.p.pump()
        self.assertEqual(proto.lost.value.code, F.CANCELLED)
        self.assertEqual(len(self.p.link.sent_types(self.p.acceptor, F.DATA, F.RST)), 1)
        self.assertEqual(bytes(proto.data), b"")

    def test_abort_is_cancelled(self):
        stream, proto, remote, rproto = self.open()
        stream.abortConnection()
        self.p.pump()
        self.assertEqual(rproto.lost.value.code, F.CANCELLED)

    def test_unknown_code_name(self):
        self.assertEqual(str(StreamReset(999, "odd")), "999: odd")

    def test_reset_resumes_paused_source(self):
        stream, proto, remote, rproto = self.open()
        source = Source()
        stream.registerProducer(source, True)
        remote.pauseProducing()
        stream.write(b"x" * (W + 1))
        self.assertTrue(source.paused)
        remote.reset(F.CANCELLED, "gone")
        self.p.pump()
        self.assertFalse(source.paused)
        self.assertEqual(stream.buffered, 0)


class FlowControlTests(Base):
    def test_paused_receiver_stops_sender_after_one_window(self):
        stream, proto, remote, rproto = self.open()
        source = Source()
        stream.registerProducer(source, True)
        remote.pauseProducing()
        payload = b"\x5a" * (2 * MB)
        stream.write(payload)
        for _ in range(5):
            self.p.pump()
            self.p.clock.advance(1)
        # Exactly one window arrived; no credit came back; the rest waits.
        self.assertEqual(len(rproto.data), W)
        self.assertEqual(stream.buffered, 2 * MB - W)
        self.assertEqual(self.p.link.sent_types(self.p.acceptor, F.WINDOW_UPDATE)[1:], [])
        self.assertTrue(source.paused)
        self.assertEqual(source.pauses, 1)
        # More writes only queue.
        stream.write(b"\x5a" * 10)
        self.p.pump()
        self.assertEqual(len(rproto.data), W)
        self.assertEqual(stream.buffered, 2 * MB - W + 10)
        remote.resumeProducing()
        self.p.pump()
        self.assertEqual(len(rproto.data), 2 * MB + 10)
        self.assertEqual(stream.buffered, 0)
        self.assertFalse(source.paused)
        self.assertEqual(source.resumes, 1)
        self.assertEqual(stream.bytes_out, 2 * MB + 10)
        self.assertEqual(remote.bytes_in, 2 * MB + 10)

    def test_pause_mid_stream(self):
        stream, proto, remote, rproto = self.open()
        stream.write(b"a" * 1000)
        self.p.pump()
        remote.pauseProducing()
        stream.write(b"b" * MB)
        self.p.pump()
        # The credit outstanding when the pause came is all that can arrive.
        self.assertEqual(len(rproto.data), W)
        remote.resumeProducing()
        self.p.pump()
        self.assertEqual(len(rproto.data), MB + 1000)

    def test_window_update_after_half(self):
        stream, proto, remote, rproto = self.open()
        stream.write(b"q" * (W // 2 - 1))
        self.p.pump()
        self.assertEqual(self.p.link.sent_types(self.p.acceptor, F.WINDOW_UPDATE, 0)[1:], [])
        stream.write(b"q")
        self.p.pump()
        updates = [f for f in self.p.link.sent_types(self.p.acceptor, F.WINDOW_UPDATE)
                   if not f[1] & F.ACK]
        self.assertEqual([u[3] for u in updates], [W // 2])
        self.assertEqual(stream._send_window, W)

    def test_resume_returns_partial_credit(self):
        stream, proto, remote, rproto = self.open()
        remote.pauseProducing()
        stream.write(b"q" * 100)
        self.p.pump()
        remote.resumeProducing()
        self.p.pump()
        updates = [f[3] for f in self.p.link.sent_types(self.p.acceptor, F.WINDOW_UPDATE)
                   if not f[1] & F.ACK]
        self.assertEqual(updates, [100])

    def test_other_stream_flows_while_one_is_stalled(self):
        stalled, sproto, sremote, srproto = self.open()
        sremote.pauseProducing()
        stalled.write(b"s" * (2 * MB))
        self.p.pump()
        busy, bproto, bremote, brproto = self.open()
        busy.write(b"b" * (2 * MB))
        self.p.pump()
        self.assertEqual(len(brproto.data), 2 * MB)
        bremote.write(b"r" * MB)
        self.p.pump()
        self.assertEqual(len(bproto.data), MB)
        self.assertEqual(len(srproto.data), W)
        self.assertFalse(self.p.dialer.closed)

    def test_sender_exceeding_credit_is_reset(self):
        stream, proto, remote, rproto = self.open()
        remote.pauseProducing()
        # Bypass the stream's own accounting, as a broken peer would.
        self.p.dialer.send_frame(F.DATA, 0, stream.id, 200000, b"x" * 200000)
        self.p.dialer.send_frame(F.DATA, 0, stream.id, 100000, b"x" * 100000)
        self.p.pump()
        self.assertEqual(rproto.lost.value.code, F.FLOW_CONTROL_ERROR)
        self.assertIn("100000 bytes with 62144 bytes of credit", rproto.lost.value.reason)
        self.assertEqual(proto.lost.value.code, F.FLOW_CONTROL_ERROR)
        self.assertEqual(len(rproto.data), 200000)
        # Only the stream ends, not the tunnel.
        self.assertFalse(self.p.acceptor.closed)
        other, oproto, oremote, orproto = self.open()
        other.write(b"fine")
        self.p.pump()
        self.assertEqual(bytes(orproto.data), b"fine")

    def test_extra_window_granted_with_ack(self):
        self.p = Pair(on_open=Acceptor(window=4 * W))
        stream, proto, remote, rproto = self.open()
        [ack] = self.p.link.sent_types(self.p.acceptor, F.WINDOW_UPDATE, F.ACK)
        self.assertEqual(ack[3], 3 * W)
        remote.pauseProducing()
        stream.write(b"w" * (8 * W))
        self.p.pump()
        self.assertEqual(len(rproto.data), 4 * W)
        remote.resumeProducing()
        self.p.pump()
        self.assertEqual(len(rproto.data), 8 * W)

    def test_register_producer_while_blocked(self):
        stream, proto, remote, rproto = self.open()
        remote.pauseProducing()
        stream.write(b"x" * (W + 5))
        source = Source()
        stream.registerProducer(source, True)
        self.assertTrue(source.paused)
        stream.unregisterProducer()
        remote.resumeProducing()
        self.p.pump()
        self.assertEqual(source.resumes, 0)
        self.assertEqual(len(rproto.data), W + 5)

    def test_no_credit_after_fin(self):
        stream, proto, remote, rproto = self.open()
        remote.pauseProducing()
        stream.write(b"x" * 1000)
        stream.loseConnection()
        self.p.pump()
        remote.resumeProducing()
        self.p.pump()
        updates = [f for f in self.p.link.sent_types(self.p.acceptor, F.WINDOW_UPDATE)
                   if not f[1] & F.ACK]
        self.assertEqual(updates, [])
        self.assertTrue(rproto.eof)

    def test_stop_producing_withholds_credit(self):
        stream, proto, remote, rproto = self.open()
        remote.stopProducing()
        stream.write(b"x" * MB)
        self.p.pump()
        self.assertEqual(len(rproto.data), W)
        self.assertIsNone(rproto.lost)


class OpenTimeoutTests(Base):
    def test_no_ack_times_out(self):
        self.p = Pair(limits=Limits(open_timeout=30),
                      on_open=lambda session, sid, metadata: object.__new__(Silent))
        stream, proto = self.p.open()
        self.p.clock.advance(29.9)
        self.assertIsNone(proto.lost)
        self.p.clock.advance(0.1)
        self.assertEqual(proto.lost.value.code, F.TIMEOUT)
        self.assertIn("30 s", proto.lost.value.reason)
        self.p.pump()
        [rst] = self.p.link.sent_types(self.p.dialer, F.DATA, F.RST)
        self.assertEqual(F.parse_rst(rst[4])[0], F.TIMEOUT)
        self.assertEqual(self.p.dialer.streams, {})

    def test_ack_cancels_timer(self):
        self.p = Pair(limits=Limits(open_timeout=30))
        stream, proto = self.p.open()
        self.assertTrue(stream.acked)
        for _ in range(6):
            self.p.clock.advance(10)
            self.p.pump()
        self.assertIsNone(proto.lost)
        self.assertEqual([c for c in self.p.clock.getDelayedCalls()
                          if c.func == stream._open_timed_out], [])

    def test_reset_cancels_timer(self):
        stream = Stream(self.p.dialer)
        sid = self.p.dialer.open(stream)
        stream.opened(sid, 30)
        stream.attach(Recorder())
        stream.reset(F.CANCELLED, "no")
        self.assertIsNone(stream._open_timer)
        self.p.clock.advance(60)
        self.assertEqual(len(self.p.link.sent_types(self.p.dialer, F.DATA, F.RST)), 1)


class Silent:
    """A stream handler that never answers (a peer that lost the open)."""

    def frameReceived(self, ftype, flags, value, payload):
        pass

    def tunnelLost(self, code, reason):
        pass

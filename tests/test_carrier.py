"""Tests for arc.tunnel.carrier: the HTTP/1.1 upgrade into a tunnel session."""

import json

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from arc.tunnel import carrier
from arc.tunnel import frames as F
from arc.tunnel.carrier import (HeadError, RawDialerProtocol, TunnelServerFactory,
                                TunnelServerProtocol, UpgradeRefused, http_error, parse_head,
                                request_head, websocket_dialer_factory)
from arc.tunnel.session import Limits, Session
from arc.tunnel.stream import Stream, StreamReset
from tests.test_session import Acceptor, Recorder

UPGRADE_HEAD = (b"GET /arc/v1/client HTTP/1.1\r\nHost: relay.example\r\n"
                b"Connection: Upgrade\r\nUpgrade: arc-tunnel/1\r\n"
                b"Authorization: Bearer  s3cret \r\n\r\n")


class FakeFactory:
    """What TunnelServerProtocol needs from its factory, recording calls."""

    head_timeout = 10.0

    def __init__(self, refuse=None):
        self.clock = Clock()
        self.refuse = refuse
        self.requests = []
        self.plain_requests = []
        self.sessions = []
        self.on_open = Acceptor()
        self.closes = []

    def accept(self, request):
        self.requests.append(request)
        if self.refuse is not None:
            raise self.refuse

        def start(send, close):
            session = Session(dialer=False, clock=self.clock, on_open=self.on_open,
                              on_close=lambda s, code, reason: self.closes.append((code, reason)))
            session.connected(send, close)
            self.sessions.append(session)
            return session

        return start

    def plain(self, request):
        self.plain_requests.append(request)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def frames_in(data):
    return F.FrameDecoder().feed(data)


def split_answer(value):
    head, _, body = value.partition(b"\r\n\r\n")
    return head.decode("latin-1").split("\r\n"), body


class ServerTests(unittest.TestCase):
    def setUp(self):
        self.factory = FakeFactory()
        self.protocol = TunnelServerProtocol(self.factory)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def feed(self, data, step=None):
        step = step or len(data)
        for i in range(0, len(data), step):
            self.protocol.dataReceived(data[i:i + step])

    def assertRefused(self, status, words):
        lines, body = split_answer(self.transport.value())
        self.assertTrue(lines[0].startswith("HTTP/1.1 %d " % status), lines[0])
        self.assertIn(words, lines[0])
        self.assertIn("Connection: close", lines)
        self.assertIn("Content-Type: application/json", lines)
        self.assertIn(words, json.loads(body)["message"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.factory.sessions, [])

    def test_head_split_across_reads(self):
        self.feed(UPGRADE_HEAD, step=3)
        [request] = self.factory.requests
        self.assertEqual((request.method, request.path), ("GET", "/arc/v1/client"))
        self.assertEqual(request.header("host"), "relay.example")
        self.assertEqual(request.bearer(), "s3cret")
        self.assertEqual(request.peer, self.transport.getPeer())
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertIn(b"Upgrade: arc-tunnel/1\r\n", self.transport.value())
        self.assertEqual(len(self.factory.sessions), 1)
        self.assertFalse(self.transport.disconnecting)
        # No head timer is left.
        self.assertEqual([c for c in self.factory.clock.getDelayedCalls()
                          if c.func == self.protocol._head_timeout], [])

    def test_frames_in_same_packet_as_head(self):
        frames = (F.header(F.DATA, F.SYN, 1, 8) + b'{"c": 1}'
                  + F.header(F.DATA, 0, 1, 5) + b"hello" + F.header(F.PING, F.SYN, 0, 77))
        self.feed(UPGRADE_HEAD + frames)
        [(stream, proto, metadata)] = self.factory.on_open.opened
        self.assertEqual(metadata, b'{"c": 1}')
        self.assertEqual(bytes(proto.data), b"hello")
        answer = self.transport.value()
        after_head = answer[answer.index(b"\r\n\r\n") + 4:]
        got = frames_in(after_head)
        self.assertIn((F.WINDOW_UPDATE, F.ACK, 1, 0, b""), got)
        self.assertIn((F.PING, F.ACK, 0, 77, b""), got)
        # Later reads go straight to the session.
        self.transport.clear()
        self.feed(F.header(F.DATA, 0, 1, 3) + b"abc")
        self.assertEqual(bytes(proto.data), b"helloabc")

    def test_session_sends_through_transport(self):
        self.feed(UPGRADE_HEAD)
        self.transport.clear()
        self.factory.sessions[0].goAway(F.GOING_AWAY)
        self.assertEqual(frames_in(self.transport.value()), [(F.GOAWAY, 0, 0, F.GOING_AWAY, b"")])
        self.factory.sessions[0].close()
        self.assertTrue(self.transport.disconnecting)

    def test_connection_lost_after_upgrade(self):
        self.feed(UPGRADE_HEAD + F.header(F.DATA, F.SYN, 1, 0))
        [(stream, proto, _)] = self.factory.on_open.opened
        self.protocol.connectionLost(Failure(error.ConnectionDone("closed cleanly")))
        exc = proto.lost.value
        self.assertIsInstance(exc, StreamReset)
        self.assertEqual(exc.code, F.TUNNEL_LOST)
        self.assertIsInstance(exc.reason, str)
        self.assertIn("closed cleanly", exc.reason)
        [(code, reason)] = self.factory.closes
        self.assertEqual(code, F.TUNNEL_LOST)
        self.assertIsInstance(reason, str)

    def test_oversized_head_incomplete(self):
        self.feed(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * carrier.MAX_HEAD, step=4096)
        self.assertRefused(431, "larger than")
        # A refused connection ignores the rest and gets no second answer.
        before = self.transport.value()
        self.feed(b"\r\n\r\n")
        self.factory.clock.advance(self.factory.head_timeout + 1)
        self.assertEqual(self.transport.value(), before)

    def test_oversized_head_complete(self):
        self.feed(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * carrier.MAX_HEAD + b"\r\n\r\n")
        self.assertRefused(431, "larger than")

    def test_head_timeout(self):
        self.feed(b"GET /arc/v1/client HTTP/1.1\r\nHost: x\r\n")
        self.factory.clock.advance(9.9)
        self.assertEqual(self.transport.value(), b"")
        self.factory.clock.advance(0.1)
        self.assertRefused(408, "not received in time")
        self.feed(b"\r\n")
        self.assertEqual(self.factory.requests, [])

    def test_plain_request(self):
        self.feed(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        [request] = self.factory.plain_requests
        self.assertEqual(request.path, "/healthz")
        self.assertEqual(self.factory.requests, [])
        self.assertTrue(self.transport.value().endswith(b"\r\n\r\nok"))
        self.assertTrue(self.transport.disconnecting)
        self.factory.clock.advance(60)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK"))

    def test_refused_by_factory(self):
        self.factory.refuse = HeadError(401, "user token rejected: unknown, revoked or missing")
        self.feed(UPGRADE_HEAD)
        self.assertRefused(401, "user token rejected: unknown, revoked or missing")
        self.feed(F.header(F.PING, F.SYN, 0, 1))
        self.assertEqual(self.factory.sessions, [])

    def test_unsupported_upgrade(self):
        self.feed(UPGRADE_HEAD.replace(b"arc-tunnel/1", b"h2c"))
        self.assertRefused(400, "unsupported upgrade")

    def test_malformed_header(self):
        self.feed(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
        self.assertRefused(400, "malformed header line")

    def test_malformed_start_line(self):
        self.feed(b"NONSENSE\r\nHost: x\r\n\r\n")
        self.assertRefused(400, "malformed start line")

    def test_connection_lost_before_head(self):
        self.feed(b"GET / HT")
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.factory.clock.getDelayedCalls(), [])


class HelperTests(unittest.TestCase):
    def test_parse_head(self):
        self.assertIsNone(parse_head(bytearray(b"GET / HTTP/1.1\r\nHost: a\r\n")))
        start, headers, rest = parse_head(bytearray(
            b"GET /p?q HTTP/1.1\r\nHost: a\r\nUpgrade: A, b\r\nupgrade: c\r\n\r\nREST"))
        self.assertEqual(start, ["GET", "/p?q", "HTTP/1.1"])
        self.assertEqual(headers, [("host", "a"), ("upgrade", "A, b"), ("upgrade", "c")])
        self.assertEqual(rest, b"REST")
        self.assertEqual(carrier.header_tokens(headers, "upgrade"), {"a", "b", "c"})
        self.assertEqual(carrier.header_value(headers, "host"), "a")
        self.assertIsNone(carrier.header_value(headers, "missing"))

    def test_space_before_colon_refused(self):
        e = self.assertRaises(HeadError, parse_head, b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")
        self.assertEqual(e.status, 400)

    def test_bearer(self):
        def bearer(value):
            headers = [] if value is None else [("authorization", value)]
            return carrier.TunnelRequest("GET", "/", headers, None).bearer()

        self.assertEqual(bearer("Bearer abc"), "abc")
        self.assertEqual(bearer("bearer   abc  "), "abc")
        self.assertIsNone(bearer("Basic abc"))
        self.assertIsNone(bearer("Bearer "))
        self.assertIsNone(bearer(None))

    def test_http_error_phrase_is_safe(self):
        answer = http_error(403, "caf\u00e9\r\nInjected: yes " + "x" * 300)
        lines, body = split_answer(answer)
        self.assertEqual(lines[0], "HTTP/1.1 403 " + ("caf???Injected: yes " + "x" * 300)[:200])
        self.assertNotIn("Injected: yes", lines[1:])
        self.assertEqual(json.loads(body)["message"], "caf\u00e9\r\nInjected: yes " + "x" * 300)
        self.assertTrue(http_error(500, "").startswith(b"HTTP/1.1 500 Error\r\n"))

    def test_request_head(self):
        head = request_head("relay:443", "/arc/v1/agent", {"Arc-Cluster": "prod",
                                                           "Authorization": "Bearer t"})
        self.assertEqual(head, b"GET /arc/v1/agent HTTP/1.1\r\nHost: relay:443\r\n"
                               b"Connection: Upgrade\r\nUpgrade: arc-tunnel/1\r\n"
                               b"Arc-Cluster: prod\r\nAuthorization: Bearer t\r\n\r\n")


class DialerTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.sessions = []
        self.protocol = RawDialerProtocol(b"HEAD\r\n\r\n", self._make_session, self.clock, 15)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.results = []
        self.protocol.upgraded.addBoth(self.results.append)

    def _make_session(self):
        session = Session(dialer=True, clock=self.clock, name="relay")
        self.sessions.append(session)
        return session

    def refusal(self):
        [result] = self.results
        self.assertIsInstance(result, Failure)
        result.trap(UpgradeRefused)
        return result.value

    def test_upgrade(self):
        self.assertEqual(self.transport.value(), b"HEAD\r\n\r\n")
        self.transport.clear()
        answer = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                  b"Upgrade: arc-tunnel/1\r\n\r\n" + F.header(F.PING, F.SYN, 0, 5))
        self.protocol.dataReceived(answer[:20])
        self.assertEqual(self.results, [])
        self.protocol.dataReceived(answer[20:])
        [session] = self.sessions
        self.assertEqual(self.results, [session])
        self.assertEqual(frames_in(self.transport.value()), [(F.PING, F.ACK, 0, 5, b"")])
        # The timeout is gone; later reads go to the session.
        self.clock.advance(14.9)
        self.assertFalse(self.transport.disconnecting)
        self.transport.clear()
        self.protocol.dataReceived(F.header(F.PING, F.SYN, 0, 6))
        self.assertEqual(frames_in(self.transport.value()), [(F.PING, F.ACK, 0, 6, b"")])
        stream = Stream(session)
        stream.opened(session.open(stream, b"m"))
        proto = Recorder()
        stream.attach(proto)
        self.protocol.connectionLost(Failure(error.ConnectionLost("reset")))
        self.assertEqual(proto.lost.value.code, F.TUNNEL_LOST)
        self.assertIn("connection to relay lost", proto.lost.value.reason)

    def test_refused_with_json_body(self):
        body = json.dumps({"message": "agent token rejected for cluster 'prod'"}).encode()
        answer = (b"HTTP/1.1 401 agent token rejected\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body)) + body
        self.protocol.dataReceived(answer[:-10])
        self.assertEqual(self.results, [])
        self.protocol.dataReceived(answer[-10:])
        exc = self.refusal()
        self.assertEqual((exc.status, exc.message),
                         (401, "agent token rejected for cluster 'prod'"))
        self.assertEqual(str(exc), "401 agent token rejected for cluster 'prod'")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.sessions, [])
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.results), 1)

    def test_refused_without_json(self):
        self.protocol.dataReceived(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\n\r\nnope")
        exc = self.refusal()
        self.assertEqual((exc.status, exc.message), (502, "Bad Gateway"))

    def test_refused_without_body(self):
        self.protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        self.assertEqual(self.refusal().status, 403)

    def test_our_own_refusal_answer_round_trips(self):
        self.protocol.dataReceived(http_error(401, "cluster 'x' is not registered at this relay"))
        exc = self.refusal()
        self.assertEqual((exc.status, exc.message),
                         (401, "cluster 'x' is not registered at this relay"))

    def test_garbage_answer(self):
        self.protocol.dataReceived(b"x" * (carrier.MAX_HEAD + 10))
        exc = self.refusal()
        self.assertEqual(exc.status, 0)
        self.assertIn("bad answer from relay", exc.message)
        self.assertTrue(self.transport.disconnected)

    def test_timeout(self):
        self.clock.advance(15)
        exc = self.refusal()
        self.assertEqual(exc.status, 0)
        self.assertIn("no answer", exc.message)
        self.assertTrue(self.transport.disconnected)

    def test_closed_before_answer(self):
        self.protocol.connectionLost(Failure(error.ConnectionRefusedError()))
        exc = self.refusal()
        self.assertIn("closed before the tunnel was up", exc.message)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- a real loopback connection over the WebSocket carrier --------------------------


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class Collector(Recorder):
    def __init__(self):
        super().__init__()
        self.done = defer.Deferred()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.done.callback(None)


class WebSocketLoopbackTests(unittest.TestCase):
    TIMEOUT = 10

    @defer.inlineCallbacks
    def echo_over_websocket(self, mask):
        from twisted.internet import reactor

        limits = Limits(ping_interval=0)
        server_closed = defer.Deferred()
        requests = []

        def accept(request):
            requests.append(request)

            def start(send, close):
                session = Session(dialer=False, clock=reactor, limits=limits, name="server",
                                  on_open=Acceptor(protocol=Echo),
                                  on_close=lambda s, c, r: server_closed.callback((c, r)))
                session.connected(send, close)
                return session

            return start

        factory = TunnelServerFactory(reactor, accept, lambda request: b"", require_mask=mask)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = "ws://127.0.0.1:%d/arc/v1/client" % port.getHost().port
        dialer = websocket_dialer_factory(
            url, {"Authorization": "Bearer tok"},
            lambda: Session(dialer=True, clock=reactor, limits=limits, name="client"),
            mask=mask, timeout=self.TIMEOUT)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        ws = yield endpoint.connect(dialer).addTimeout(self.TIMEOUT, reactor)
        session = yield ws.upgraded.addTimeout(self.TIMEOUT, reactor)
        self.assertEqual(ws.maskClientFrames, mask)
        self.assertEqual(requests[0].path, "/arc/v1/client")
        self.assertEqual(requests[0].bearer(), "tok")
        self.assertEqual(requests[0].header("sec-websocket-protocol"), carrier.WS_SUBPROTOCOL)

        payload = bytes(range(256)) * 4096         # 1 MiB: several windows each way
        stream = Stream(session)
        stream.opened(session.open(stream, b'{"cluster": "demo"}'), self.TIMEOUT)
        collector = Collector()
        stream.attach(collector)
        stream.write(payload)
        stream.loseConnection()
        yield collector.done.addTimeout(self.TIMEOUT, reactor)
        self.assertTrue(collector.lost.check(error.ConnectionDone), collector.lost)
        self.assertEqual(len(collector.data), len(payload))
        self.assertEqual(bytes(collector.data), payload)
        self.assertTrue(collector.eof)
        self.assertEqual(session.streams, {})

        session.close("test over")
        yield ws.is_closed
        code, why = yield server_closed.addTimeout(self.TIMEOUT, reactor)
        self.assertEqual(code, F.TUNNEL_LOST)

    def test_masked(self):
        return self.echo_over_websocket(mask=True)

    def test_unmasked(self):
        return self.echo_over_websocket(mask=False)


class _Batcher(carrier._Batching):
    """The WebSocket carriers' batching, over a recorded sendMessage."""

    def __init__(self, clock):
        self.transport = StringTransport()
        self.transport.reactor = clock
        self.events = []

    def sendMessage(self, payload, isBinary=False):
        self.events.append(("message", bytes(payload), isBinary))

    def dropConnection(self, abort=False):
        self.events.append(("drop",))


class WebSocketBatchTests(unittest.TestCase):
    """Frames a session writes in one reactor turn leave as one WebSocket message."""

    def setUp(self):
        self.clock = Clock()
        self.ws = _Batcher(self.clock)

    def test_one_message_per_turn(self):
        self.ws._send([b"frame-1"])
        self.ws._send([b"frame-2a", memoryview(b"frame-2b")])
        self.ws._send([b"frame-3"])
        self.assertEqual(self.ws.events, [], "nothing leaves before the turn ends")
        self.clock.advance(0)
        self.assertEqual(self.ws.events, [("message", b"frame-1frame-2aframe-2bframe-3", True)])
        self.ws._send([b"next"])
        self.clock.advance(0)
        self.assertEqual(self.ws.events[1:], [("message", b"next", True)])

    def test_large_batches_leave_at_once_in_bounded_messages(self):
        piece = b"x" * (300 * 1024)
        for _ in range(8):
            self.ws._send([piece])
        self.clock.advance(0)
        sizes = [len(event[1]) for event in self.ws.events]
        self.assertEqual(sum(sizes), 8 * len(piece))
        self.assertGreater(len(sizes), 1)
        # Each stays far below the 4 MiB both ends accept.
        self.assertTrue(all(size < carrier.WS_BATCH + len(piece) for size in sizes), sizes)

    def test_close_sends_what_is_waiting_first(self):
        self.ws._send([b"GOAWAY frame"])
        self.ws._close()
        self.assertEqual(self.ws.events, [("message", b"GOAWAY frame", True), ("drop",)])
        self.clock.advance(0)
        self.assertEqual(len(self.ws.events), 2, "nothing is sent twice")

"""Limits: each one configurable, each violation refused with a clear message
and logged once (repeats are rate-limited), affecting only the offender.

Unit tests run the relay, sessions and listeners in memory with a Clock; one
test runs the real relay process with small limits.
"""

import json
import os
import types

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial import unittest

from arc import config, status
from arc.client.proxy import KubectlFactory
from arc.guard.guard import parse_guard
from arc.guard.proxy import GuardProtocol
from arc.ratelog import RateLimitedLog
from arc.relay.registry import Binding, Identity, Registry, token_digest
from arc.relay.relay import AGENT_PATH, CLIENT_PATH, Relay, RelayLimits, parse_relay_limits
from arc.tunnel import frames as F
from arc.tunnel.carrier import HeadError, TunnelRequest, TunnelServerProtocol
from arc.tunnel.session import Limits, RefuseStream, Session
from arc.tunnel.settings import parse_limits
from arc.tunnel.stream import Stream
from tests.test_carrier import FakeFactory
from tests.test_guard import Guard as FakeGuard, request, static_authenticator
from tests.test_session import Acceptor, Pair, Recorder

ALICE = Identity("alice", ("dev",))
BOB = Identity("bob", ("dev",))


def registry():
    return Registry({"demo": token_digest("agent-token")},
                    {token_digest("alice-token"): ALICE, token_digest("bob-token"): BOB},
                    {"demo": Binding(groups=frozenset({"dev"}))})


def head(path, token, cluster=None):
    headers = [("authorization", "Bearer " + token)]
    if cluster:
        headers.append(("arc-cluster", cluster))
    return TunnelRequest("GET", path, headers, types.SimpleNamespace(host="127.0.0.1",
                                                                      port=40000))


class Transport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


class Wire:
    """One tunnel between a relay-side session (made by ``start``) and ``far``."""

    def __init__(self, start, far):
        self.to_far, self.to_relay = [], []
        self.relay = start(lambda chunks: self.to_far.append(b"".join(chunks)), lambda: None)
        self.far = far
        far.connected(lambda chunks: self.to_relay.append(b"".join(chunks)), lambda: None)

    def pump(self):
        moved = False
        while self.to_far or self.to_relay:
            moved = True
            out, self.to_far = b"".join(self.to_far), []
            if out:
                self.far.dataReceived(out)
            out, self.to_relay = b"".join(self.to_relay), []
            if out:
                self.relay.dataReceived(out)
        return moved


class LogLines:
    """A Logger whose events are kept in a list."""

    def __init__(self):
        self.events = []
        self.logger = Logger(observer=self.events.append)

    def texts(self):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events]


class RelayLimitTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.lines = LogLines()
        quiet = Limits(ping_interval=1000.0, dead_after=2000.0)
        self.relay = Relay(self.clock, registry(), quiet,
                           relay_limits=RelayLimits(max_agent_tunnels_per_cluster=2,
                                                    max_streams_per_user=3))
        self.relay.log = self.lines.logger

    def agent(self):
        acceptor = Acceptor()
        far = Session(dialer=True, clock=self.clock, name="agent", on_open=acceptor)
        wire = Wire(self.relay.accept(head(AGENT_PATH, "agent-token", "demo")), far)
        wire.acceptor = acceptor
        return wire

    def client(self, token):
        far = Session(dialer=True, clock=self.clock, name="client")
        return Wire(self.relay.accept(head(CLIENT_PATH, token)), far)

    def test_agent_tunnels_per_cluster(self):
        first, second = self.agent(), self.agent()
        for _ in range(5):
            e = self.assertRaises(HeadError, self.relay.accept,
                                  head(AGENT_PATH, "agent-token", "demo"))
            self.assertIn(e.status, (429, 503))
            self.assertIn("limits.max_agent_tunnels_per_cluster", e.message)
            self.assertIn("'demo'", e.message)
        # Five refusals, one log line; the tunnels already up are untouched.
        refusals = [t for t in self.lines.texts() if "agent refused" in t]
        self.assertEqual(len(refusals), 1, refusals)
        self.assertEqual(len(self.relay.agents["demo"]), 2)
        self.assertFalse(first.relay.closed or second.relay.closed)
        # A tunnel going away makes room for the next agent.
        first.relay.connectionLost("gone")
        self.agent()
        self.assertEqual(len(self.relay.agents["demo"]), 2)

    def open(self, wire):
        stream = Stream(wire.far)
        proto = Recorder()
        stream.opened(wire.far.open(stream, b'{"cluster": "demo"}'), 30)
        stream.attach(proto)
        return stream, proto

    def test_streams_per_user(self):
        agent = self.agent()
        alice, bob = self.client("alice-token"), self.client("bob-token")
        mine = [self.open(alice) for _ in range(3)]
        alice.pump()
        agent.pump()
        alice.pump()
        self.assertTrue(all(s.acked for s, _ in mine))
        refused = [self.open(alice) for _ in range(4)]
        alice.pump()
        for stream, proto in refused:
            exc = proto.lost.value
            self.assertEqual(exc.code, F.LIMIT_EXCEEDED)
            self.assertIn("limits.max_streams_per_user", exc.reason)
            self.assertIn("'alice'", exc.reason)
            # kubectl sees a 503 Status carrying that message.
            code, message = status.for_reset(exc.code, exc.reason)
            self.assertEqual(code, 503)
            self.assertIn("max_streams_per_user", message)
        lines = [t for t in self.lines.texts() if "stream refused" in t]
        self.assertEqual(len(lines), 1, lines)
        # Only the offender is limited: bob opens, alice's streams still run.
        theirs, proto = self.open(bob)
        bob.pump()
        agent.pump()
        bob.pump()
        self.assertTrue(theirs.acked)
        self.assertIsNone(proto.lost)
        self.assertTrue(all(p.lost is None for _, p in mine))
        self.assertEqual(self.relay.user_streams, {"alice": 3, "bob": 1})
        # One of alice's streams ending gives her room again.
        mine[0][0].reset(F.CANCELLED, "done")
        alice.pump()
        agent.pump()
        self.assertEqual(self.relay.user_streams["alice"], 2)
        again, proto = self.open(alice)
        alice.pump()
        agent.pump()
        alice.pump()
        self.assertTrue(again.acked)
        self.assertIsNone(proto.lost)

    def test_refusals_logged_again_after_the_interval(self):
        self.agent()
        self.agent()
        for _ in range(3):
            self.assertRaises(HeadError, self.relay.accept,
                              head(AGENT_PATH, "agent-token", "demo"))
        self.clock.advance(61)
        self.assertRaises(HeadError, self.relay.accept, head(AGENT_PATH, "agent-token", "demo"))
        refusals = [t for t in self.lines.texts() if "agent refused" in t]
        self.assertEqual(len(refusals), 2)
        self.assertIn("2 more times", refusals[1])


class PendingOpenTests(unittest.TestCase):
    def test_pending_opens_limited_until_the_peer_answers(self):
        pair = Pair(limits=Limits(max_pending_opens=3))
        for _ in range(3):
            pair.open(pump=False)
        e = self.assertRaises(RefuseStream, pair.open, pump=False)
        self.assertEqual(e.code, F.LIMIT_EXCEEDED)
        self.assertIn("tunnel.max_pending_opens", e.reason)
        self.assertEqual(len(pair.dialer.pending_opens), 3)
        # The peer answers (ACK): the opens are no longer pending.
        pair.pump()
        self.assertEqual(pair.dialer.pending_opens, set())
        pair.open()

    def test_pending_open_removed_with_its_stream(self):
        pair = Pair(limits=Limits(max_pending_opens=1))
        stream = Stream(pair.dialer)
        stream.opened(pair.dialer.open(stream), 5)
        stream.attach(Recorder())
        pair.clock.advance(5)      # open timeout: the stream is reset and removed
        self.assertEqual(pair.dialer.pending_opens, set())
        pair.open(pump=False)


class ConfigTests(unittest.TestCase):
    def load(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return config.load(path)

    def test_relay_limits(self):
        limits = parse_relay_limits(self.load(
            "limits:\n  max_agent_tunnels_per_cluster: 3\n  max_streams_per_user: 50\n"))
        self.assertEqual(limits, RelayLimits(3, 50))
        self.assertEqual(parse_relay_limits(self.load("{}\n")), RelayLimits())
        self.assertRaises(Exception, parse_relay_limits,
                          self.load("limits:\n  max_streams_per_user: 0\n"))
        self.assertRaises(Exception, parse_relay_limits,
                          self.load("limits:\n  max_stream_per_user: 5\n"))

    def test_pending_opens(self):
        limits = parse_limits(self.load("tunnel:\n  max_pending_opens: 7\n"))
        self.assertEqual(limits.max_pending_opens, 7)
        self.assertEqual(parse_limits(self.load("{}\n")).max_pending_opens, 1000)

    def test_guard_idle_timeout(self):
        self.assertEqual(parse_guard(self.load("{}\n")).idle_timeout, 300.0)
        cfg = parse_guard(self.load("guard:\n  idle_timeout: 20\n"))
        self.assertEqual(cfg.idle_timeout, 20.0)


class HeadTimeoutTests(unittest.TestCase):
    def test_relay_silent_connection_aborted_and_logged_once(self):
        factory = FakeFactory()
        lines = LogLines()
        protos = []
        for _ in range(20):
            proto = TunnelServerProtocol(factory)
            proto.log = lines.logger
            transport = Transport()
            proto.makeConnection(transport)
            protos.append((proto, transport))
        factory.clock.advance(factory.head_timeout)
        for proto, transport in protos:
            # Nothing arrived (a TLS handshake that never finished looks the
            # same from here): dropped at once, no answer written.
            self.assertTrue(transport.aborted)
            self.assertEqual(transport.value(), b"")
        self.assertEqual(len(lines.events), 1)

    def test_client_proxy_head_timeout(self):
        clock = Clock()
        proxy = types.SimpleNamespace(reactor=clock, head_timeout=5.0, clusters={})
        factory = KubectlFactory(proxy, "demo")
        lines = LogLines()
        silent = factory.buildProtocol(None)
        silent.log = lines.logger
        slow = factory.buildProtocol(None)
        slow.log = lines.logger
        quick = factory.buildProtocol(None)
        transports = []
        for proto in (silent, slow, quick):
            transport = Transport()
            proto.makeConnection(transport)
            transports.append(transport)
        for byte in b"GET /api HTTP/1.1\r\nHost":
            slow.dataReceived(bytes([byte]))
            clock.advance(0.1)
        quick.dataReceived(b"GET /api HTTP/1.1\r\n\r\n")
        clock.advance(5)
        self.assertTrue(transports[0].aborted)
        self.assertTrue(transports[1].aborted)
        self.assertFalse(transports[2].aborted)
        self.assertEqual(len(lines.events), 1)

    def test_guard_idle_timeout_between_requests_only(self):
        clock = Clock()
        guard = FakeGuard(static_authenticator())
        guard.cfg = types.SimpleNamespace(idle_timeout=30.0)
        guard.upstream.reactor = clock
        idle = GuardProtocol(guard, "peer")
        idle_t = StringTransport()
        idle.makeConnection(idle_t)
        busy = GuardProtocol(guard, "peer")
        busy_t = StringTransport()
        busy.makeConnection(busy_t)
        clock.advance(29)
        busy.dataReceived(request())      # a request in flight (a watch, say)
        clock.advance(1)
        self.assertTrue(idle_t.disconnecting)
        self.assertFalse(busy_t.disconnecting)
        clock.advance(3600)
        self.assertFalse(busy_t.disconnecting)

    def test_guard_slow_head_answered_408(self):
        clock = Clock()
        guard = FakeGuard(static_authenticator())
        guard.cfg = types.SimpleNamespace(idle_timeout=30.0)
        guard.upstream.reactor = clock
        slow = GuardProtocol(guard, "peer")
        transport = StringTransport()
        slow.makeConnection(transport)
        for byte in request(headers=[("X-Pad", "a" * 100)])[:-4]:
            if transport.disconnecting:
                break
            slow.dataReceived(bytes([byte]))
            clock.advance(0.25)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertIn(b"idle_timeout", transport.value())
        self.assertEqual(guard.upstream.connections, [])


class RateLimitedLogTests(unittest.TestCase):
    def test_one_line_per_key_and_interval(self):
        clock = Clock()
        lines = []
        log = RateLimitedLog(clock, interval=10)

        def emit(fmt, **fields):
            lines.append((fmt, fields))

        for _ in range(100):
            log.emit("a", emit, "violation {x}", x=1)
        log.emit("b", emit, "violation {x}", x=2)
        self.assertEqual(len(lines), 2)
        clock.advance(10)
        log.emit("a", emit, "violation {x}", x=1)
        self.assertEqual(lines[-1][1]["suppressed"], 99)

    def test_key_table_bounded(self):
        log = RateLimitedLog(Clock(), max_keys=10)
        for i in range(1000):
            log.emit(i, lambda *a, **k: None, "x")
        self.assertLessEqual(len(log._last), 10)


class RelayProcessLimitTest(unittest.TestCase):
    """The real relay with small limits: an extra agent and a greedy user are refused."""

    timeout = 120

    def test_limits_in_the_real_chain(self):
        from arc.testing.procs import wait_for
        from tests.hostile import HostileChain

        def limits(data):
            data["limits"] = {"max_agent_tunnels_per_cluster": 1, "max_streams_per_user": 2}

        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        chain = HostileChain(base, relay_change=limits)
        self.addCleanup(chain.stop)
        chain.start()
        # A second agent tunnel for the cluster: 429 naming the limit.
        status_line, body = chain.agent_refusal()
        self.assertIn(b" 429 ", status_line)
        self.assertIn("limits.max_agent_tunnels_per_cluster", json.loads(body)["message"])
        # Two watches hold the user's two streams; a third request gets a 503
        # Status naming the limit, and works again once a watch ends.
        watches = [chain.kubectl_background("get", "--raw",
                                            "/api/v1/namespaces/default/pods?watch=true")
                   for _ in range(2)]

        def stop_watches():
            for proc in watches:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
                proc.stdout.close()
                proc.stderr.close()

        self.addCleanup(stop_watches)
        refused = wait_for(lambda: _failed(chain.kubectl("get", "--raw", "/version",
                                                         check=False)),
                           30, "the third stream to be refused")
        self.assertIn("max_streams_per_user", refused)
        watches[0].kill()
        wait_for(lambda: chain.kubectl("get", "--raw", "/version", check=False).returncode == 0,
                 30, "the user to get room again")
        log = chain.parts["relay"].output()
        self.assertEqual(log.count("(limits.max_streams_per_user)"), 1, log)
        self.assertTrue(chain.parts["relay"].running())


def _failed(result):
    return result.stdout + result.stderr if result.returncode != 0 else None

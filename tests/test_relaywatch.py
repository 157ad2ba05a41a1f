"""Tests for arc.ops.relaywatch and arc.ops.relaymetrics: a real Relay, tunnels in memory."""

import json

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial import unittest

from arc.identity.model import AuthError
from arc.ops.relaymetrics import RelayCollector
from arc.ops.relaywatch import RECENT_ERRORS, RelayWatch
from arc.relay.registry import Binding, Identity, Registry, token_digest
from arc.relay.relay import AGENT_PATH, CLIENT_PATH, Relay, RelayLimits
from arc.tunnel import frames as F
from arc.tunnel.carrier import HeadError, TunnelRequest
from arc.tunnel.session import Limits, Session
from arc.tunnel.stream import Stream
from tests.test_session import Acceptor, Recorder

AGENT_TOKEN = "agent-token-for-demo-0123456789"
USER_TOKEN = "user-token-of-alice-0123456789"
LIMITS = Limits(ping_interval=0)


def registry():
    return Registry(clusters={"demo": token_digest(AGENT_TOKEN),
                              "spare": token_digest("spare-agent-token-0123456789")},
                    users={token_digest(USER_TOKEN): Identity("alice", ("dev",))},
                    bindings={"demo": Binding(groups=frozenset(["dev"])),
                              "spare": Binding(users=frozenset(["alice"]))})


def request(path, token=None, peer=("10.0.0.5", 4242), **headers):
    fields = [(k.replace("_", "-"), v) for k, v in headers.items()]
    if token is not None:
        fields.append(("authorization", "Bearer " + token))
    return TunnelRequest("GET", path, fields, IPv4Address("TCP", *peer))


class Wire:
    """A carrier between the session the relay's ``start`` makes and a dialer session."""

    def __init__(self, start, dialer):
        self.to_relay, self.to_dialer = [], []
        self.closed = False
        self.relay_side = start(lambda chunks: self.to_dialer.append(b"".join(chunks)),
                                self._close)
        self.dialer = dialer
        dialer.connected(lambda chunks: self.to_relay.append(b"".join(chunks)), self._close)

    def _close(self):
        self.closed = True

    def pump(self):
        moved = False
        while self.to_relay or self.to_dialer:
            moved = True
            while self.to_relay:
                self.relay_side.dataReceived(self.to_relay.pop(0))
            while self.to_dialer:
                self.dialer.dataReceived(self.to_dialer.pop(0))
        return moved


class Harness:
    def __init__(self, authenticator=None):
        self.clock = Clock()
        self.now = [1000.0]
        self.relay = Relay(self.clock, registry(), LIMITS, authenticator)
        self.watch = RelayWatch(self.relay, walltime=lambda: self.now[0])
        self.wires = []

    def pump(self):
        while any([w.pump() for w in self.wires]):
            pass

    def agent(self, cluster="demo", token=AGENT_TOKEN, version="0.1.0"):
        acceptor = Acceptor()
        session = Session(dialer=True, clock=self.clock, limits=LIMITS, on_open=acceptor)
        start = self.watch.accept(request(AGENT_PATH, token, arc_cluster=cluster,
                                          arc_version=version))
        self.wires.append(Wire(start, session))
        return session, acceptor

    def client(self, token=USER_TOKEN):
        session = Session(dialer=True, clock=self.clock, limits=LIMITS)
        start = self.watch.accept(request(CLIENT_PATH, token, peer=("10.0.0.9", 5555)))
        self.wires.append(Wire(start, session))
        return session

    def open(self, client, cluster="demo", data=b""):
        stream = Stream(client)
        metadata = json.dumps({"cluster": cluster}).encode()
        stream.opened(client.open(stream, metadata), 30)
        proto = Recorder()
        stream.attach(proto)
        if data:
            stream.write(data)
        self.pump()
        return stream, proto


class RelayWatchTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness()

    def test_agents_clients_and_streams_in_the_snapshot(self):
        h = self.h
        h.now[0] = 1000.0
        _, acceptor = h.agent(version="1.2.3")
        client = h.client()
        h.now[0] = 1010.0
        stream, proto = h.open(client, data=b"GET / HTTP/1.1\r\n\r\n")
        remote, rproto, _ = acceptor.opened[0]
        remote.write(b"x" * 300)
        h.pump()
        snap = h.watch.snapshot()
        [demo, spare] = snap["clusters"]
        self.assertEqual(demo["name"], "demo")
        [agent] = demo["agents"]
        self.assertEqual(agent["peer"], "10.0.0.5:4242")
        self.assertEqual(agent["version"], "1.2.3")
        self.assertEqual(agent["since"], 1000.0)
        self.assertEqual(agent["streams"], 1)
        self.assertEqual(demo["streams_open"], 1)
        self.assertEqual(demo["streams_opened"], 1)
        self.assertEqual(demo["bytes_client_to_agent"], 18)
        self.assertEqual(demo["bytes_agent_to_client"], 300)
        self.assertEqual(spare["agents"], [])
        self.assertEqual(snap["users"], [{"user": "alice", "cluster": "demo", "streams_open": 1,
                                          "bytes": 318, "oldest": 1010.0}])
        self.assertEqual(snap["relay"]["agent_tunnels"], 1)
        self.assertEqual(snap["relay"]["client_tunnels"], 1)
        text = json.dumps(snap)
        self.assertNotIn(AGENT_TOKEN, text)
        self.assertNotIn(USER_TOKEN, text)

    def test_ended_streams_add_their_bytes_and_normal_ends_are_not_failures(self):
        h = self.h
        _, acceptor = h.agent()
        client = h.client()
        stream, proto = h.open(client, data=b"abc")
        remote, rproto, _ = acceptor.opened[0]
        remote.write(b"hello")
        remote.loseConnection()
        stream.loseConnection()
        h.pump()
        self.assertEqual(h.watch.streams, {})
        self.assertEqual(h.watch.bytes[("demo", "client_to_agent")], 3)
        self.assertEqual(h.watch.bytes[("demo", "agent_to_client")], 5)
        # kubectl going away (CANCELLED) is an ordinary end.
        other, _ = h.open(client, data=b"defg")
        other.reset(F.CANCELLED, "the connection from kubectl was closed")
        h.pump()
        self.assertEqual(h.watch.bytes[("demo", "client_to_agent")], 7)
        self.assertEqual(dict(h.watch.failed), {})
        self.assertEqual(list(h.watch.errors), [])
        self.assertEqual(h.relay.streams_open, 0)

    def test_resets_and_refusals_are_counted_by_code_and_recorded(self):
        h = self.h
        _, acceptor = h.agent()
        client = h.client()
        h.open(client)
        remote, _, _ = acceptor.opened[0]
        remote.reset(F.UPSTREAM_UNREACHABLE, "agent cannot reach the API server")
        h.pump()
        h.open(client, cluster="nowhere")
        h.open(client, cluster="spare")          # registered, no agent
        self.assertEqual(dict(h.watch.failed), {"UPSTREAM_UNREACHABLE": 1,
                                                "UNKNOWN_CLUSTER": 1, "CLUSTER_OFFLINE": 1})
        newest = list(reversed(h.watch.errors))
        self.assertEqual([e["code"] for e in newest],
                         ["CLUSTER_OFFLINE", "UNKNOWN_CLUSTER", "UPSTREAM_UNREACHABLE"])
        self.assertEqual(newest[2]["what"], "stream reset (agent side)")
        self.assertEqual(newest[2]["reason"], "agent cannot reach the API server")
        self.assertEqual(newest[2]["user"], "alice")
        self.assertEqual(newest[2]["cluster"], "demo")

    def test_a_lost_agent_tunnel_resets_its_streams_and_is_recorded(self):
        h = self.h
        agent, _ = h.agent()
        client = h.client()
        stream, proto = h.open(client)
        agent.close("agent process stopped")
        h.wires[0].relay_side.connectionLost("tunnel connection lost: gone")
        h.pump()
        self.assertEqual(proto.lost.value.code, F.TUNNEL_LOST)
        self.assertEqual(h.watch.agents, {})
        self.assertEqual(h.watch.failed["TUNNEL_LOST"], 1)
        whats = [e["what"] for e in h.watch.errors]
        self.assertEqual(whats, ["stream reset (agent side)", "agent tunnel down"])
        self.assertEqual(h.watch.snapshot()["clusters"][0]["agents"], [])

    def test_upgrade_refusals_are_counted_by_reason_without_tokens(self):
        h = self.h
        for cluster, token in (("demo", "wrong-agent-token"), ("ghost", AGENT_TOKEN),
                               ("demo", None)):
            self.assertRaises(HeadError, h.watch.accept,
                              request(AGENT_PATH, token, arc_cluster=cluster))
        self.assertRaises(HeadError, h.watch.accept, request(CLIENT_PATH, "not-a-user-token"))
        self.assertEqual(dict(h.watch.auth_failures), {
            ("agent", "bad_token"): 1, ("agent", "unknown_cluster"): 1,
            ("agent", "missing_token"): 1, ("client", "unknown_token"): 1})
        text = json.dumps(h.watch.snapshot())
        self.assertNotIn("wrong-agent-token", text)
        self.assertNotIn("not-a-user-token", text)
        self.assertEqual(len(h.watch.errors), 4)
        # The name an unauthenticated peer gave is not repeated.
        self.assertNotIn("ghost", text)
        # A request for no tunnel endpoint is not an authentication failure.
        self.assertRaises(HeadError, h.watch.accept, request("/elsewhere", USER_TOKEN))
        self.assertEqual(len(h.watch.errors), 4)

    def test_a_refusal_for_a_limit_is_recorded_but_is_no_auth_failure(self):
        h = self.h
        h.relay.relay_limits = RelayLimits(max_agent_tunnels_per_cluster=1)
        h.agent()
        self.assertRaises(HeadError, h.watch.accept,
                          request(AGENT_PATH, AGENT_TOKEN, arc_cluster="demo"))
        self.assertEqual(dict(h.watch.auth_failures), {})
        [entry] = h.watch.errors
        self.assertEqual((entry["what"], entry["cluster"]), ("agent refused", "demo"))
        self.assertIn("max_agent_tunnels_per_cluster", entry["reason"])

    def test_identity_provider_refusals_are_counted_by_code(self):
        class Provider:
            def authenticate(self, token):
                return defer.fail(AuthError("expired", "the token expired 3 min ago"))

            def services(self):
                return []

        h = Harness(authenticator=Provider())
        d = h.watch.accept(request(CLIENT_PATH, "eyJhbGciOi.eyJzdWIiOi.sig"))
        self.failureResultOf(d, HeadError)
        self.assertEqual(dict(h.watch.auth_failures), {("client", "expired"): 1})
        [entry] = h.watch.errors
        self.assertEqual(entry["what"], "client refused")
        self.assertIn("expired", entry["reason"])
        self.assertEqual(h.watch.relay.authenticator.services(), [])

    def test_the_ring_buffer_is_bounded_and_coalesces_bursts(self):
        watch = self.h.watch
        for i in range(RECENT_ERRORS + 10):
            watch.note("stream refused", "reason %d" % i)
        self.assertEqual(len(watch.errors), RECENT_ERRORS)
        self.assertEqual(watch.errors[0]["reason"], "reason 10")
        for _ in range(5):
            watch.note("stream refused", "same again", user="alice", code="FORBIDDEN")
        self.assertEqual(watch.errors[-1]["count"], 5)
        watch.note("client refused", "user token rejected: Bearer abc.def")
        self.assertNotIn("abc.def", watch.errors[-1]["reason"])


class RelayCollectorTests(unittest.TestCase):
    def test_exposition(self):
        h = Harness()
        _, acceptor = h.agent()
        client = h.client()
        stream, _ = h.open(client, data=b"12345")
        h.open(client, cluster="spare")
        stream.loseConnection()
        remote, _, _ = acceptor.opened[0]
        remote.loseConnection()
        h.pump()
        self.assertRaises(HeadError, h.watch.accept, request(CLIENT_PATH, None))
        registry = CollectorRegistry()
        registry.register(RelayCollector(h.watch))
        text = generate_latest(registry).decode()
        for line in ('arc_relay_agent_tunnels{cluster="demo"} 1.0',
                     'arc_relay_agent_tunnels{cluster="spare"} 0.0',
                     'arc_relay_streams_open{cluster="demo"} 0.0',
                     'arc_relay_client_tunnels 1.0',
                     'arc_relay_streams_opened_total{cluster="demo"} 1.0',
                     'arc_relay_streams_failed_total{code="CLUSTER_OFFLINE"} 1.0',
                     'arc_relay_stream_bytes_total{cluster="demo",direction="client_to_agent"} '
                     '5.0',
                     'arc_relay_auth_failures_total{reason="missing_token",tunnel="client"} 1.0',
                     'arc_relay_agent_connects_total{cluster="demo"} 1.0',
                     'arc_relay_client_connects_total 1.0'):
            self.assertIn(line + "\n", text)
        self.assertNotIn("arc_relay_agent_rtt_seconds{", text)

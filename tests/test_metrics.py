"""Tests for arc.metrics, arc.ops.endpoint, arc.ops.tunnelend and arc.ops.guardmetrics.

Unit tests first (settings, stream counters on in-memory tunnels, guard
records, the HTTP listener); then the chain as real processes: kubectl
requests move the counters of relay, agent and client, an agent restart
shows as a reconnection at the relay, and the agent's ``/readyz`` turns
503 while the relay is down and 200 once it is back.
"""

import json
import os
import socket
import ssl
import tempfile

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from arc.config import Node
from arc.errors import ConfigError
from arc.guard.audit import AuditRecord
from arc.metrics import (DEFAULT_LISTEN, MetricsSettings, code_name, parse_metrics,
                         status_class, tunnel_readiness)
from arc.ops.endpoint import DialerCollector, metrics_service
from arc.ops.guardmetrics import GuardMetrics
from arc.ops.tunnelend import StreamMetrics
from arc.relay.relay import CLIENT_PATH
from arc.service import bound_port
from arc.tunnel import frames as F
from arc.tunnel.carrier import request_head
from arc.tunnel.session import Limits
from tests.chain import wait_for
from tests.opschain import OpsChain, value
from arc.tunnel.stream import Stream
from tests.test_session import Acceptor, Pair, Recorder


def node(data):
    return Node(data, "/etc/arc/part.yaml")


class SettingsTests(unittest.TestCase):
    def test_absent_is_off_and_empty_takes_the_loopback_default(self):
        self.assertIsNone(parse_metrics(node({})))
        self.assertEqual(parse_metrics(node({"metrics": {}})), MetricsSettings(DEFAULT_LISTEN))
        self.assertEqual(DEFAULT_LISTEN, "tcp:9090:interface=127.0.0.1")
        self.assertEqual(parse_metrics(node({"metrics": {"listen": "tcp:9100"}})).listen,
                         "tcp:9100")

    def test_mistakes_name_the_key(self):
        for section, key in (({"listen": "ssl:9090"}, "metrics.listen"),
                             ({"port": 9090}, "metrics.port"),
                             ({"listen": 9090}, "metrics.listen")):
            with self.assertRaises(ConfigError) as caught:
                parse_metrics(node({"metrics": section}))
            self.assertEqual(caught.exception.key, key)

    def test_labels_stay_bounded(self):
        self.assertEqual(code_name(F.FORBIDDEN), "FORBIDDEN")
        self.assertEqual(code_name(123456), "UNKNOWN")
        self.assertEqual([status_class(s) for s in (101, 200, 404, 503, 0, 999)],
                         ["1xx", "2xx", "4xx", "5xx", "other", "other"])


class PartConfigTests(unittest.TestCase):
    """Every part takes the section: relay, agent, client daemon, standalone guard."""

    def test_each_part_reads_its_metrics_section(self):
        import yaml

        from arc import demo
        from arc.agent.config import load_agent_config
        from arc.client.config import load_client_config
        from arc.guard.tap import load_guard_config
        from arc.relay.config import load_relay_config

        base = self.mktemp()
        files = demo.prepare(base, relay_port=18443, client_port=47011)
        guard = os.path.join(base, "guard.yaml")
        with open(guard, "w") as f:
            yaml.safe_dump({"cluster": "demo", "tls": {"cert_file": "relay.crt",
                                                       "key_file": "relay.key"}}, f)
        loaders = ((files.relay_config, load_relay_config), (files.agent_config,
                   load_agent_config), (files.client_config, load_client_config),
                   (guard, load_guard_config))
        for i, (path, loader) in enumerate(loaders):
            self.assertIsNone(loader(path).metrics)
            with open(path) as f:
                data = yaml.safe_load(f)
            data["metrics"] = {"listen": "tcp:%d:interface=127.0.0.1" % (9100 + i)}
            with open(path, "w") as f:
                yaml.safe_dump(data, f)
            self.assertEqual(loader(path).metrics.listen, "tcp:%d:interface=127.0.0.1"
                             % (9100 + i))
        self.assertIsNone(load_relay_config(files.relay_config).status)


class FakeDialer:
    relay_url = "https://relay.example:443"

    def __init__(self):
        self.session = None
        self.last_error = None
        self.connects = 0


class DialerStateTests(unittest.TestCase):
    def test_readiness_follows_the_tunnel(self):
        dialer = FakeDialer()
        ready = tunnel_readiness(dialer)
        self.assertIn("down: connecting", ready())
        dialer.last_error = "relay rejected the agent credential"
        self.assertIn("relay rejected the agent credential", ready())
        pair = Pair(limits=Limits(ping_interval=0))
        dialer.session = pair.dialer
        self.assertIsNone(ready())
        pair.dialer.goAway()
        self.assertIn("draining", ready())
        pair.dialer.close("gone")
        self.assertIn("https://relay.example:443", ready())

    def test_collector(self):
        dialer = FakeDialer()
        registry = CollectorRegistry()
        registry.register(DialerCollector("arc_agent_", dialer))
        text = generate_latest(registry).decode()
        self.assertIn("arc_agent_tunnel_up 0.0\n", text)
        self.assertIn("arc_agent_tunnel_connects_total 0.0\n", text)
        self.assertNotIn("\narc_agent_tunnel_rtt_seconds ", text)
        dialer.session = Pair(limits=Limits(ping_interval=0)).dialer
        dialer.session.rtt = 0.0125
        dialer.connects = 2
        text = generate_latest(registry).decode()
        self.assertIn("arc_agent_tunnel_up 1.0\n", text)
        self.assertIn("arc_agent_tunnel_connects_total 2.0\n", text)
        self.assertIn("arc_agent_tunnel_rtt_seconds 0.0125\n", text)
        self.assertNotIn("replica_tunnels_up", text)
        dialer.tunnels_up = 2
        self.assertIn("arc_agent_replica_tunnels_up 2.0\n",
                      generate_latest(registry).decode())


class StreamMetricsTests(unittest.TestCase):
    def setUp(self):
        self.acceptor = Acceptor()
        self.pair = Pair(limits=Limits(ping_interval=0), on_open=self.acceptor)
        self.registry = CollectorRegistry()
        self.metrics = StreamMetrics(self.registry, "client", self.pair.clock)

    def sample(self, name, **labels):
        return self.registry.get_sample_value(name, labels) or 0

    def open(self, data=b""):
        stream = Stream(self.pair.dialer)
        stream.opened(self.pair.dialer.open(stream, b"{}"), 30)
        self.metrics.watch(stream)
        stream.attach(Recorder())
        if data:
            stream.write(data)
        return stream

    def test_open_ack_bytes_and_end(self):
        stream = self.open(b"request")
        self.assertEqual(self.sample("arc_client_streams_open"), 1)
        self.pair.clock.advance(0.02)
        self.pair.pump()
        self.assertEqual(self.sample("arc_client_stream_open_seconds_count"), 1)
        self.assertAlmostEqual(self.sample("arc_client_stream_open_seconds_sum"), 0.02)
        remote, _, _ = self.acceptor.opened[0]
        remote.write(b"answer!!")
        remote.loseConnection()
        stream.loseConnection()
        self.pair.pump()
        self.assertEqual(self.sample("arc_client_streams_opened_total"), 1)
        self.assertEqual(self.sample("arc_client_streams_open"), 0)
        self.assertEqual(self.sample("arc_client_stream_bytes_total", direction="sent"), 7)
        self.assertEqual(self.sample("arc_client_stream_bytes_total", direction="received"), 8)
        self.assertEqual(self.sample("arc_client_streams_failed_total", code="CANCELLED"), 0)

    def test_resets_count_by_code_except_a_closed_kubectl_connection(self):
        first = self.open()
        second = self.open()
        self.pair.pump()
        self.acceptor.opened[0][0].reset(F.UPSTREAM_UNREACHABLE, "no API server")
        second.reset(F.CANCELLED, "the connection from kubectl was closed")
        self.pair.pump()
        self.assertTrue(first.disconnected)
        self.assertEqual(self.sample("arc_client_streams_failed_total",
                                     code="UPSTREAM_UNREACHABLE"), 1)
        self.assertEqual(self.sample("arc_client_streams_failed_total", code="CANCELLED"), 0)
        self.assertEqual(self.sample("arc_client_streams_open"), 0)
        # A stream that never got its ACK leaves no latency behind.
        lost = self.open()
        self.pair.dialer.connectionLost("carrier gone")
        self.assertTrue(lost.disconnected)
        self.assertEqual(self.metrics._opening, {})
        self.assertEqual(self.sample("arc_client_streams_failed_total", code="TUNNEL_LOST"), 1)

    def test_the_agent_side_has_no_open_latency(self):
        registry = CollectorRegistry()
        StreamMetrics(registry, "agent", self.pair.clock)
        text = generate_latest(registry).decode()
        self.assertIn("arc_agent_streams_opened_total 0.0", text)
        self.assertNotIn("open_seconds", text)


class GuardMetricsTests(unittest.TestCase):
    def test_requests_by_decision_and_status_class_and_auth_failures_by_code(self):
        registry = CollectorRegistry()
        metrics = GuardMetrics(registry)
        for decision, status, reason in (
                ("allow", 200, ""), ("allow", 201, ""), ("allow", 101, ""),
                ("deny", 401, "authentication: expired"),
                ("deny", 401, "authentication: bad_signature"),
                ("deny", 401, "no bearer token in the request: ..."),
                ("deny", 401, "malformed bearer token in the Authorization header"),
                ("deny", 403, "client impersonation: not allowed"),
                ("error", 502, "upstream unreachable"),
                ("allow", 401, "")):    # the API server's own 401, passed through
            metrics.request(AuditRecord(decision=decision, status=status, reason=reason))

        def sample(name, **labels):
            return registry.get_sample_value(name, labels) or 0

        self.assertEqual(sample("arc_guard_requests_total", decision="allow",
                                status_class="2xx"), 2)
        self.assertEqual(sample("arc_guard_requests_total", decision="allow",
                                status_class="1xx"), 1)
        self.assertEqual(sample("arc_guard_requests_total", decision="deny",
                                status_class="4xx"), 5)
        self.assertEqual(sample("arc_guard_requests_total", decision="error",
                                status_class="5xx"), 1)
        self.assertEqual(sample("arc_guard_requests_total", decision="allow",
                                status_class="4xx"), 1)
        for reason, n in (("expired", 1), ("bad_signature", 1), ("missing_token", 1),
                          ("bad_header", 1)):
            self.assertEqual(sample("arc_guard_auth_failures_total", reason=reason), n)


class EndpointTests(unittest.TestCase):
    """The listener itself, on a real loopback port."""

    @defer.inlineCallbacks
    def test_metrics_health_and_readiness(self):
        registry = CollectorRegistry()
        StreamMetrics(registry, "agent", reactor)
        reason = ["the tunnel to the relay https://r is down: connecting"]
        service = metrics_service(reactor, MetricsSettings("tcp:0:interface=127.0.0.1"),
                                  registry, lambda: reason[0])
        service.startService()
        self.addCleanup(service.stopService)
        port = (yield bound_port(service)).getHost().port
        agent = Agent(reactor)

        @defer.inlineCallbacks
        def get(path):
            answer = yield agent.request(b"GET", b"http://127.0.0.1:%d%s" % (port, path))
            body = yield readBody(answer)
            return answer.code, answer.headers, body

        code, headers, body = yield get(b"/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"text/plain", headers.getRawHeaders(b"content-type")[0])
        self.assertIn(b"arc_agent_streams_opened_total 0.0", body)
        code, _, body = yield get(b"/healthz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "alive"}))
        code, _, body = yield get(b"/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body), {"status": "not ready", "reason": reason[0]})
        reason[0] = None
        code, _, body = yield get(b"/readyz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ready"}))
        code, _, _ = yield get(b"/elsewhere")
        self.assertEqual(code, 404)


# -- real processes ----------------------------------------------------------------------


class MetricsChainTests(unittest.TestCase):
    """relay, agent and client as processes, each serving /metrics on loopback."""

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="arc-metrics-")
        self.chain = OpsChain(self.base, extra_clusters=("offline",))
        self.addCleanup(self.chain.stop)
        self.chain.start()

    def scrape(self, part):
        return self.chain.scrape(part)

    def settle(self, part, check, what, timeout=20):
        """Poll ``part``'s metrics until ``check(samples)``; returns the samples."""
        return wait_for(lambda: (lambda s: s if check(s) else None)(self.scrape(part)),
                        timeout, what)

    def bad_client_upgrade(self):
        """A client tunnel upgrade with a token the relay does not know."""
        files = self.chain.files
        context = ssl.create_default_context(cafile=os.path.join(files.state_dir,
                                                                 "relay-ca.crt"))
        with socket.create_connection(("127.0.0.1", files.relay_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(request_head("localhost", CLIENT_PATH,
                                         {"Authorization": "Bearer not-a-known-token"}))
                answer = tls.recv(4096)
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer)

    def test_counters_move_and_readiness_follows_the_relay(self):
        chain = self.chain
        for args in (("get", "pods"), ("get", "pods", "-A"), ("get", "--raw", "/version"),
                     ("logs", "ticker")):
            chain.kubectl(*args)
        refused = chain.kubectl("--context", "offline", "get", "pods", check=False)
        self.assertNotEqual(refused.returncode, 0)
        self.bad_client_upgrade()

        # Every stream has ended once the byte counters of both ends agree.
        def ended(s):
            return (value(s, "arc_relay_streams_open", cluster="demo") == 0
                    and value(s, "arc_relay_stream_bytes_total", cluster="demo",
                              direction="client_to_agent") > 0)

        relay = self.settle("relay", ended, "the relay's streams to end")
        agent = self.settle("agent", lambda s: value(s, "arc_agent_streams_open") == 0,
                            "the agent's streams to end")
        client = self.settle("client", lambda s: value(s, "arc_client_streams_open") == 0,
                             "the client's streams to end")

        self.assertEqual(value(relay, "arc_relay_agent_tunnels", cluster="demo"), 1)
        self.assertEqual(value(relay, "arc_relay_agent_tunnels", cluster="offline"), 0)
        self.assertEqual(value(relay, "arc_relay_client_tunnels"), 1)
        opened = value(relay, "arc_relay_streams_opened_total", cluster="demo")
        self.assertGreaterEqual(opened, 4)
        self.assertGreaterEqual(value(relay, "arc_relay_streams_failed_total",
                                      code="CLUSTER_OFFLINE"), 1)
        self.assertEqual(value(relay, "arc_relay_auth_failures_total", tunnel="client",
                               reason="unknown_token"), 1)
        self.assertEqual(value(relay, "arc_relay_agent_connects_total", cluster="demo"), 1)
        up = value(relay, "arc_relay_stream_bytes_total", cluster="demo",
                   direction="client_to_agent")
        down = value(relay, "arc_relay_stream_bytes_total", cluster="demo",
                     direction="agent_to_client")
        self.assertGreater(down, up)

        self.assertEqual(value(agent, "arc_agent_tunnel_up"), 1)
        self.assertEqual(value(agent, "arc_agent_tunnel_connects_total"), 1)
        self.assertEqual(value(agent, "arc_agent_streams_opened_total"), opened)
        # The agent counts the payload the relay forwarded, byte for byte.
        self.assertEqual(value(agent, "arc_agent_stream_bytes_total", direction="received"), up)
        self.assertEqual(value(agent, "arc_agent_stream_bytes_total", direction="sent"), down)
        self.assertGreaterEqual(value(agent, "arc_guard_requests_total", decision="allow",
                                      status_class="2xx"), 4)

        self.assertEqual(value(client, "arc_client_tunnel_up"), 1)
        self.assertGreaterEqual(value(client, "arc_client_streams_opened_total"), opened + 1)
        self.assertEqual(value(client, "arc_client_stream_open_seconds_count"), opened)
        self.assertEqual(value(client, "arc_client_stream_bytes_total", direction="received"),
                         down)
        self.assertGreaterEqual(value(client, "arc_client_streams_failed_total",
                                      code="CLUSTER_OFFLINE"), 1)

        for part in ("relay", "agent", "client"):
            self.assertEqual(chain.get(part, "/healthz")[0], 200)
            self.assertEqual(chain.get(part, "/readyz"), (200, '{"status": "ready"}\n'))

        # An agent restart is a reconnection at the relay.
        chain.parts["agent"].stop()
        self.settle("relay", lambda s: value(s, "arc_relay_agent_tunnels", cluster="demo") == 0,
                    "the relay to see the agent go")
        chain.start_agent()
        relay = self.settle("relay", lambda s: value(s, "arc_relay_agent_tunnels",
                                                     cluster="demo") == 1,
                            "the restarted agent's tunnel at the relay", timeout=30)
        self.assertEqual(value(relay, "arc_relay_agent_connects_total", cluster="demo"), 2)
        self.settle("agent", lambda s: value(s, "arc_agent_tunnel_up") == 1,
                    "the restarted agent to serve metrics")

        # The relay goes away: the agent is alive but not ready, and says why.
        chain.parts["relay"].stop()

        def not_ready(part):
            status, body = chain.get(part, "/readyz")
            return json.loads(body) if status == 503 else None

        reason = wait_for(lambda: not_ready("agent"), 20, "the agent's /readyz to fail")
        self.assertEqual(reason["status"], "not ready")
        self.assertIn("https://localhost:%d" % chain.files.relay_port, reason["reason"])
        self.assertEqual(chain.get("agent", "/healthz")[0], 200)
        self.assertEqual(value(self.scrape("agent"), "arc_agent_tunnel_up"), 0)
        wait_for(lambda: not_ready("client"), 20, "the client's /readyz to fail")

        # Back: ready again after one more connect.
        chain.start_relay()
        wait_for(lambda: chain.get("agent", "/readyz")[0] == 200, 60,
                 "the agent's /readyz to recover")
        wait_for(lambda: chain.get("client", "/readyz")[0] == 200, 60,
                 "the client's /readyz to recover")
        self.assertEqual(value(self.scrape("agent"), "arc_agent_tunnel_connects_total"), 2)
        self.assertGreaterEqual(value(self.scrape("client"), "arc_client_tunnel_connects_total"),
                                2)
        relay = self.scrape("relay")
        self.assertEqual(value(relay, "arc_relay_agent_tunnels", cluster="demo"), 1)
        self.assertEqual(chain.get("relay", "/readyz")[0], 200)
        chain.kubectl("get", "pods")

"""Faults with real processes on 127.0.0.1: killed and frozen parts, big answers.

Every test runs its own chain (API server emulator or a test backend,
relay, agent, client) with a 1 s keepalive and a 3 s dead-peer limit, and
bounds every wait.  After a fault, kubectl must end promptly with an error
and work again once the part is back; the relay and the client must come
back to the descriptors and streams they had before.

Related: ``test_faults_restart`` (relay restarts, graceful stops) and
``test_faults_cancel`` (half-close and random cancellations, in process).
"""

import os
import signal
import time

from twisted.trial import unittest

from arc.agent.config import load_agent_config
from arc.client.config import load_client_config
from arc.testing.procs import wait_for
from tests.chain import read_until
from tests.faultbackend import pattern
from tests.faults import ROOT, ChainTestCase, LineClock, tcp_connections, wait_all

DEAD_AFTER = 3.0
# Detection may come a little after dead_after (timer and log polling), never
# a whole ping interval later.
DETECTION_SLACK = 0.6


class AgentKilledTests(ChainTestCase):
    def test_agent_killed_mid_request_watch_logs_exec(self):
        chain = self.chain
        chain.kubectl("get", "pods")
        baseline = self.baseline("relay", "client")
        procs = self.start_long_requests()
        # A request in flight: the agent is frozen, so the request waits for
        # its answer when the agent dies.
        before = chain.relay_health()["streams_open"]
        chain.signal("agent", signal.SIGSTOP)
        procs["get"] = self.kubectl_process("get", "pods", "--request-timeout=60s")
        wait_for(lambda: chain.relay_health()["streams_open"] > before, 10,
                 "the request to reach the relay")
        chain.parts["agent"].kill()
        results = wait_all(procs, 15)
        print("\nkubectl get, agent killed mid-request: %s"
              % results["get"][2].strip().splitlines()[-1] if results["get"] else "")
        hung = [name for name, result in results.items() if result is None]
        self.assertEqual(hung, [], "still running 15 s after the agent died: %s" % hung)
        for name in ("logs", "exec", "get"):
            code, _, stderr = results[name]
            self.assertNotEqual(code, 0, "%s: %s" % (name, stderr))
            self.assertTrue(stderr.strip(), "%s ended without saying why" % name)
        self.assertIn("cluster 'demo'", results["get"][2])
        self.assertRegex(results["get"][2], "lost its tunnel|is offline")
        for name in ("logs", "exec"):
            self.assertRegex(results[name][2], "connection reset|EOF|closed")
        # kubectl get -w ends too; kubectl itself discards the cause of a
        # broken watch (it returns no error), so only its end is checked.
        print("\nended after the agent was killed: %s"
              % ", ".join("%s %.2f s (exit %d)" % (name, r[1], r[0])
                          for name, r in sorted(results.items())))
        # While the agent is away kubectl learns why, at once.
        started = time.monotonic()
        offline = chain.kubectl("get", "pods", check=False)
        self.assertNotEqual(offline.returncode, 0)
        self.assertIn("cluster 'demo' is offline", offline.stderr)
        self.assertLess(time.monotonic() - started, 10)
        chain.start_agent()
        self.works_again()
        self.assertBackToBaseline(baseline)


class FrozenRelayTests(ChainTestCase):
    def test_relay_frozen_both_ends_detect_and_recover(self):
        chain = self.chain
        relay_port = chain.files.relay_port
        baseline = self.baseline("client")
        logs = self.kubectl_process("logs", "-f", "ticker")
        read_until(logs, lambda text: text.count("\n") >= 2, 30)
        tunnels = {name: {c for c in tcp_connections(chain.parts[name].pid)
                          if c[1] == relay_port} for name in ("agent", "client")}
        for name, found in tunnels.items():
            self.assertEqual(len(found), 1, "%s tunnel sockets: %s" % (name, found))
        clocks = {name: LineClock(chain.parts[name].log) for name in ("agent", "client")}
        chain.signal("relay", signal.SIGSTOP)
        frozen = time.monotonic()
        detected = {name: clock.wait(["tunnel is dead"], DEAD_AFTER + 5)["tunnel is dead"]
                    - frozen for name, clock in clocks.items()}
        ended = wait_all({"logs": logs}, DEAD_AFTER + 5, since=frozen)["logs"]
        self.assertIsNotNone(ended, "kubectl logs -f still runs with the relay frozen")
        self.assertNotEqual(ended[0], 0)
        self.assertTrue(ended[2].strip())
        print("\nrelay frozen: agent detected after %.2f s, client after %.2f s, "
              "logs -f ended after %.2f s (dead_after %.0f s, ping_interval 1 s)"
              % (detected["agent"], detected["client"], ended[1], DEAD_AFTER))
        for name, seconds in detected.items():
            self.assertLessEqual(seconds, DEAD_AFTER + DETECTION_SLACK, name)
        self.assertLessEqual(ended[1], DEAD_AFTER + 1.5)
        # The dead tunnels' sockets are gone while the relay is still frozen
        # (a graceful TLS close would wait for the frozen relay forever).
        for name, old in tunnels.items():
            wait_for(lambda: not (old & tcp_connections(chain.parts[name].pid)), 3,
                     "the %s to drop its dead tunnel's socket" % name)
        chain.cont("relay")
        self.works_again()
        self.assertBackToBaseline(baseline)


class FrozenRelayOverWebSocketTests(FrozenRelayTests):
    """The same over the WebSocket carrier: its dead tunnels are aborted too."""

    chain_options = {"transport": "websocket"}


class FrozenAgentTests(ChainTestCase):
    def test_agent_frozen_relay_detects_and_recovers(self):
        chain = self.chain
        relay_port = chain.files.relay_port
        baseline = self.baseline("relay", "client")
        logs = self.kubectl_process("logs", "-f", "ticker")
        read_until(logs, lambda text: text.count("\n") >= 2, 30)
        [(agent_port, _)] = [c for c in tcp_connections(chain.parts["agent"].pid)
                             if c[1] == relay_port]
        clock = LineClock(chain.parts["relay"].log)
        chain.signal("agent", signal.SIGSTOP)
        frozen = time.monotonic()
        detected = clock.wait(["tunnel is dead"], DEAD_AFTER + 5)["tunnel is dead"] - frozen
        ended = wait_all({"logs": logs}, DEAD_AFTER + 5, since=frozen)["logs"]
        self.assertIsNotNone(ended, "kubectl logs -f still runs with the agent frozen")
        self.assertNotEqual(ended[0], 0)
        print("\nagent frozen: relay detected after %.2f s, logs -f ended after %.2f s"
              % (detected, ended[1]))
        self.assertLessEqual(detected, DEAD_AFTER + DETECTION_SLACK)
        self.assertLessEqual(ended[1], DEAD_AFTER + 1.5)
        wait_for(lambda: (relay_port, agent_port) not in tcp_connections(
            chain.parts["relay"].pid), 3, "the relay to drop the dead agent tunnel's socket")
        offline = chain.kubectl("get", "pods", check=False)
        self.assertIn("cluster 'demo' is offline", offline.stderr)
        chain.cont("agent")
        self.works_again()
        self.assertBackToBaseline(baseline)


class BigAnswerTests(ChainTestCase):
    chain_options = {"backends": ["A"]}

    def test_target_writes_20mb_and_closes(self):
        chain = self.chain
        size = 20 * 1024 * 1024
        expected = pattern(size)
        for query in ("", "&abrupt=1"):
            answer = chain.raw_get("/big?size=%d%s" % (size, query))
            self.assertIsNone(answer.error, query)
            self.assertEqual(answer.status, 200, query)
            self.assertNotIn("content-length", answer.headers)
            self.assertEqual(len(answer.body), size, query)
            self.assertTrue(answer.body == expected, "bytes differ (%s)" % (query or "TLS close"))
        # The chain is still good for the next request.
        self.assertEqual(chain.raw_get("/who").body, b"A")


class ExampleKeysTests(unittest.TestCase):
    """The reconnect and drain keys documented in etc/ load once uncommented."""

    def load(self, name, loader):
        with open(os.path.join(ROOT, "etc", name)) as f:
            text = f.read()
        for key in ("reconnect_initial", "reconnect_max"):
            text = text.replace("  # %s:" % key, "  %s:" % key)
        text = text.replace("# tunnel:\n", "tunnel:\n").replace(
            "#   ping_interval", "  ping_interval").replace(
            "#   dead_after", "  dead_after").replace("#   drain_timeout", "  drain_timeout")
        base = self.mktemp()
        os.makedirs(base)
        for extra in ("relay-ca.crt", "token"):
            with open(os.path.join(base, extra), "w") as f:
                f.write("-----BEGIN CERTIFICATE-----\n" if extra.endswith("crt") else "t\n")
        text = text.replace("/var/run/secrets/arc/agent-token", "token").replace(
            "~/.config/arc/relay-token", "token").replace("~/.config/arc/prod-eu.token", "token")
        path = os.path.join(base, name)
        with open(path, "w") as f:
            f.write(text)
        return loader(path)

    def test_agent_and_client_keys(self):
        for name, loader in (("agent.yaml", load_agent_config),
                             ("client.yaml", load_client_config)):
            cfg = self.load(name, loader)
            self.assertEqual((cfg.relay.reconnect_initial, cfg.relay.reconnect_max),
                             (0.5, 30.0), name)
            self.assertEqual(cfg.limits.drain_timeout, 30.0, name)
            policy = cfg.relay.backoff()
            self.assertLessEqual(policy(1), 1.0)
            self.assertLessEqual(policy(20), 30.0)

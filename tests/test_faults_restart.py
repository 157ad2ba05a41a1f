"""Relay restarts and graceful stops, with real processes on 127.0.0.1.

- A killed relay comes back on the same port: six agents (one process per
  cluster) and the client reconnect by themselves, at jittered times.
- SIGTERM of an agent: GOAWAY, new streams go to a second agent of the
  same cluster, running ones finish until the drain deadline, the rest are
  reset then.
- SIGTERM of the relay: GOAWAY to everyone, no new tunnels or streams, a
  running download finishes and the relay exits as soon as it has.
"""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from arc.testing.procs import port_in_use, wait_for
from tests.chain import read_until
from tests.faults import ChainTestCase, LineClock, wait_all

CLUSTERS = ["demo", "c1", "c2", "c3", "c4", "c5"]
RECONNECT = (0.5, 4.0)


class RelayKilledTests(ChainTestCase):
    chain_options = {"extra_clusters": CLUSTERS[1:], "reconnect": RECONNECT}

    def test_relay_killed_everyone_reconnects_with_jitter(self):
        chain = self.chain
        for cluster in CLUSTERS[1:]:
            chain.start_agent(chain.agent_config("agent-" + cluster, cluster=cluster),
                              name="agent-" + cluster)
        wait_for(lambda: chain.relay_health()["agent_tunnels"] == len(CLUSTERS), 30,
                 "every agent's tunnel")
        baseline = self.baseline("client")
        logs = self.kubectl_process("logs", "-f", "ticker")
        read_until(logs, lambda text: text.count("\n") >= 2, 30)
        clock = LineClock(chain.parts["relay"].log)
        chain.parts["relay"].kill()
        killed = time.monotonic()
        ended = wait_all({"logs": logs}, 10, since=killed)["logs"]
        self.assertIsNotNone(ended, "kubectl logs -f still runs with the relay gone")
        self.assertNotEqual(ended[0], 0)
        self.assertTrue(ended[2].strip())
        # Meanwhile kubectl is told the tunnel is down, at once.
        down = chain.kubectl("get", "pods", check=False)
        self.assertNotEqual(down.returncode, 0)
        self.assertIn("tunnel to the relay", down.stderr)
        time.sleep(1.0)
        chain.start_relay()
        listening = time.monotonic()
        texts = ["agent tunnel up: cluster=%s peer=" % c for c in CLUSTERS]
        texts.append("client tunnel up:")
        seen = clock.wait(texts, 2 * RECONNECT[1] + 10)
        agents = sorted(seen[t] - listening for t in texts[:-1])
        spread = agents[-1] - agents[0]
        print("\nrelay back: agents reconnected after %s s (spread %.2f s), client after "
              "%.2f s" % (", ".join("%.2f" % t for t in agents), spread,
                          seen["client tunnel up:"] - listening))
        # Full jitter: a fleet does not come back in one burst.
        self.assertGreater(spread, 0.2)
        self.assertLess(agents[-1], 2 * RECONNECT[1] + 5)
        for cluster in CLUSTERS:
            wait_for(lambda: chain.kubectl("--context", cluster, "get", "pods",
                                           check=False).returncode == 0, 20,
                     "cluster %s to answer again" % cluster)
        self.assertBackToBaseline(baseline)


def in_thread(f, *args, **kw):
    box = {}

    def run():
        try:
            box["result"] = f(*args, **kw)
        except BaseException as e:       # reported by the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    box["thread"] = thread
    return box


class AgentDrainTests(ChainTestCase):
    chain_options = {"backends": ["A", "B"], "tunnel": {"drain_timeout": 5}}

    def test_agent_sigterm_drains_and_a_second_agent_takes_over(self):
        chain = self.chain
        started = threading.Event()
        slow = in_thread(chain.raw_get, "/slow?seconds=4&pieces=40", on_head=started.set)
        forever = in_thread(chain.raw_get, "/forever")
        self.assertTrue(started.wait(10))
        wait_for(lambda: chain.relay_health()["streams_open"] == 2, 10,
                 "both requests to run through agent A")
        chain.start_agent(chain.agent_config("agent-b", upstream="B"), name="agent-b")
        wait_for(lambda: chain.relay_health()["agent_tunnels"] == 2, 20, "agent B's tunnel")
        clock = LineClock(chain.parts["agent"].log)
        chain.signal("agent", signal.SIGTERM)
        stopped = time.monotonic()
        clock.wait(["draining the tunnel"], 5)
        # New requests go to agent B only, while A drains.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: chain.raw_get("/who").body, range(12)))
        self.assertEqual(set(answers), {b"B"})
        slow["thread"].join(15)
        answer = slow["result"]
        self.assertIsNone(answer.error)
        self.assertTrue(answer.complete, "the download was cut: %d bytes" % len(answer.body))
        self.assertEqual(answer.body, b"s" * 40 * 1024)
        # The endless one is reset at the drain deadline, then agent A exits.
        forever["thread"].join(15)
        cut = forever["result"]
        self.assertIsNotNone(cut.error, "the endless answer ended without an error")
        self.assertGreaterEqual(cut.ended - stopped, 4.5)
        self.assertLess(cut.ended - stopped, 8)
        chain.parts["agent"].proc.wait(10)
        exited = time.monotonic() - stopped
        self.assertLess(exited, 8)
        self.assertIn("drain deadline of 5.0 s passed: reset 1 streams",
                      chain.parts["agent"].output())
        print("\nagent SIGTERM: download finished after %.2f s, endless answer reset after "
              "%.2f s, agent exited after %.2f s (drain_timeout 5 s)"
              % (answer.ended - stopped, cut.ended - stopped, exited))
        self.assertEqual(chain.raw_get("/who").body, b"B")
        wait_for(lambda: chain.relay_health()["agent_tunnels"] == 1, 10,
                 "agent A's tunnel to go")


class RelayDrainTests(ChainTestCase):
    chain_options = {"backends": ["A"], "tunnel": {"drain_timeout": 10}}

    def test_relay_sigterm_drains_then_everyone_reconnects(self):
        chain = self.chain
        started = threading.Event()
        slow = in_thread(chain.raw_get, "/slow?seconds=3&pieces=30", on_head=started.set)
        self.assertTrue(started.wait(10))
        relay = chain.parts["relay"]
        clock = LineClock(relay.log)
        chain.signal("relay", signal.SIGTERM)
        stopped = time.monotonic()
        clock.wait(["draining: 1 streams running"], 5)
        # No new tunnels, no new streams; kubectl is told why at once.
        self.assertFalse(port_in_use(chain.files.relay_port))
        refused = chain.raw_get("/who", timeout=10)
        self.assertEqual(refused.status, 503)
        self.assertIn(b"the relay is shutting down", refused.body)
        slow["thread"].join(10)
        answer = slow["result"]
        self.assertIsNone(answer.error)
        self.assertTrue(answer.complete, "the download was cut: %d bytes" % len(answer.body))
        relay.proc.wait(10)
        exited = time.monotonic() - stopped
        print("\nrelay SIGTERM: download finished after %.2f s, relay exited after %.2f s "
              "(drain_timeout 10 s)" % (answer.ended - stopped, exited))
        # It exits once the stream is done, well before the deadline.
        self.assertLess(exited, answer.ended - stopped + 2)
        self.assertNotIn("drain deadline", relay.output())
        chain.start_relay()
        wait_for(lambda: chain.raw_get("/who", timeout=10).body == b"A", 20,
                 "the chain to work again through the new relay")

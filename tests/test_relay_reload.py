"""The relay re-reads its registry without dropping the tunnels it still admits.

Unit tests drive :class:`RegistryReloader` with a fake relay and a
:class:`Clock`; the process tests run the real relay, agents, client and
kubectl, change the file with ``arc cluster`` and check in the relay's log
that the tunnels that should stay were never re-established.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import yaml
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest

from arc.relay.config import load_relay_config
from arc.relay.registry import Identity, token_digest
from arc.relay.reload import RegistryReloader
from arc.testing.procs import port_in_use, twist, wait_for
from arc.tunnel import frames as F
from tests.chain import Chain

# -- unit tests -------------------------------------------------------------------------


class FakeSession:
    def __init__(self, identity=None):
        self.identity = identity
        self.failed = None

    def fail(self, code, reason):
        self.failed = (code, reason)


class FakeRelay:
    def __init__(self, registry):
        self.registry = registry
        self.agents = {}
        self.clients = set()


def relay_config(clusters, users=None, bindings=None, **extra):
    config = {"listen": "tcp:0:interface=127.0.0.1",
              "tls": {"cert_file": "relay.crt", "key_file": "relay.key"},
              "clusters": {name: {"agent_token_sha256": token_digest(token)}
                           for name, token in clusters.items()},
              "users": {name: {"token_sha256": token_digest(token), "groups": list(groups)}
                        for name, (token, groups) in (users or {}).items()},
              "bindings": bindings or [{"cluster": name, "groups": ["team"]}
                                       for name in clusters]}
    config.update(extra)
    return config


class ReloaderTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="arc-reload-")
        for name in ("relay.crt", "relay.key"):
            open(os.path.join(self.dir, name), "w").close()
        self.path = os.path.join(self.dir, "relay.yaml")
        self.write(relay_config({"a": "token-a", "b": "token-b"},
                                users={"alice": ("alice-token", ["team"])}))
        self.relay = FakeRelay(load_relay_config(self.path).registry)
        self.a, self.b = FakeSession(), FakeSession()
        self.relay.agents = {"a": [self.a], "b": [self.b]}
        self.alice = FakeSession(Identity("alice", ("team",)))
        self.oidc_user = FakeSession(Identity("https://idp#bob", ("team",)))
        self.relay.clients = {self.alice, self.oidc_user}
        self.clock = Clock()
        self.now = [time.time() + 10]
        self.reloader = RegistryReloader(self.path, self.relay, self.clock, interval=2.0,
                                         hangup=False, walltime=lambda: self.now[0])

    def write(self, config):
        with open(self.path, "w") as f:
            yaml.safe_dump(config, f)

    def test_new_cluster_and_binding_apply_and_tunnels_stay(self):
        self.write(relay_config({"a": "token-a", "b": "token-b", "c": "token-c"},
                                users={"alice": ("alice-token", ["team"])},
                                bindings=[{"cluster": "a", "groups": ["team"]},
                                          {"cluster": "b", "groups": ["team"]},
                                          {"cluster": "c", "users": ["alice"]}]))
        with capturedLogs() as events:
            self.assertTrue(self.reloader.reload("test"))
        registry = self.relay.registry
        self.assertEqual(sorted(registry.clusters), ["a", "b", "c"])
        self.assertTrue(registry.allowed(Identity("alice", ()), "c"))
        self.assertTrue(registry.agent_ok("c", "token-c"))
        self.assertEqual([s.failed for s in (self.a, self.b, self.alice, self.oidc_user)],
                         [None] * 4)
        [event] = [e for e in events if "reloaded" in e["log_format"]]
        self.assertEqual((event["clusters"], event["agents"], event["clients"]), (3, 0, 0))

    def test_removed_cluster_and_replaced_token_close_those_agents_only(self):
        other = FakeSession()
        self.relay.agents["b"].append(other)
        self.write(relay_config({"b": "new-token-b"}, users={"alice": ("alice-token", ["team"])}))
        self.reloader.reload("test")
        self.assertEqual(self.a.failed[0], F.UNAUTHORIZED)
        self.assertIn("cluster 'a' was removed", self.a.failed[1])
        for session in (self.b, other):
            self.assertEqual(session.failed[0], F.UNAUTHORIZED)
            self.assertIn("agent token of cluster 'b' was replaced", session.failed[1])
        self.assertFalse(self.relay.registry.agent_ok("b", "token-b"))
        self.assertIsNone(self.alice.failed)

    def test_revoked_static_user_is_disconnected(self):
        self.write(relay_config({"a": "token-a", "b": "token-b"},
                                users={"alice": ("rotated-token", ["team"])}))
        self.reloader.reload("test")
        self.assertEqual(self.alice.failed[0], F.UNAUTHORIZED)
        self.assertIn("static token of user 'alice'", self.alice.failed[1])
        self.assertIsNone(self.oidc_user.failed)
        self.assertIsNone(self.a.failed)

    def test_bad_file_is_refused_with_one_line_and_old_registry_stays(self):
        before = self.relay.registry
        config = relay_config({"a": "token-a"})
        config["bindings"].append({"cluster": "ghost", "groups": ["team"]})
        self.write(config)
        with capturedLogs() as events:
            self.assertFalse(self.reloader.reload("test"))
        self.assertIs(self.relay.registry, before)
        self.assertIsNone(self.a.failed)
        self.assertIsNone(self.b.failed)
        [event] = events
        self.assertEqual(event["log_level"].name, "error")
        self.assertEqual(event["file"], self.path)
        self.assertEqual(event["key"], "bindings[1].cluster")
        self.assertIn("'ghost' is not listed under clusters", event["reason"])
        self.assertEqual(self.reloader.refusals, 1)

    def test_poll_reloads_once_per_change_after_the_file_settles(self):
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.assertEqual(self.reloader.reloads, 0)
        self.write(relay_config({"a": "token-a"}))
        mtime = os.stat(self.path).st_mtime
        self.now[0] = mtime + 0.2          # just written: maybe still being written
        self.clock.advance(2)
        self.assertEqual(self.reloader.reloads, 0)
        self.now[0] = mtime + 5
        self.clock.advance(2)
        self.assertEqual(self.reloader.reloads, 1)
        self.assertEqual(sorted(self.relay.registry.clusters), ["a"])
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertEqual(self.reloader.reloads, 1)

    def test_bad_file_is_reported_once_not_at_every_poll(self):
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        with open(self.path, "w") as f:
            f.write("clusters: [unclosed\n")
        with capturedLogs() as events:
            for _ in range(5):
                self.clock.advance(2)
        self.assertEqual(len(events), 1)
        self.assertIn("not valid YAML", events[0]["reason"])

    def test_missing_file_keeps_running_configuration(self):
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        before = self.relay.registry
        os.unlink(self.path)
        with capturedLogs() as events:
            self.clock.advance(2)
            self.clock.advance(2)
        self.assertIs(self.relay.registry, before)
        self.assertEqual(len(events), 1)
        self.assertIn("cannot be checked", events[0]["log_format"])

    def test_restart_only_keys_are_named(self):
        self.write(relay_config({"a": "token-a", "b": "token-b"},
                                users={"alice": ("alice-token", ["team"])},
                                head_timeout=3))
        with capturedLogs() as events:
            self.reloader.reload("test")
        [warning] = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(warning["keys"], "head_timeout")

    def test_sighup_handler_installed_and_restored(self):
        previous = signal.getsignal(signal.SIGHUP)
        reloader = RegistryReloader(self.path, self.relay, self.clock, interval=0)
        reloader.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), reloader._sighup)
        reloader.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)


# -- real processes ---------------------------------------------------------------------

AGENT_UP = "agent tunnel up: cluster=%s "


class ReloadChain(Chain):
    """The demo chain with clusters demo, other and third known to the client;
    the relay starts without third and checks its file every ``interval`` s."""

    def __init__(self, base, interval):
        super().__init__(base, extra_clusters=("other", "third"))
        self.interval = interval

    def start_relay(self):
        def without_third(config):
            del config["clusters"]["third"]
            config["bindings"] = [b for b in config["bindings"] if b["cluster"] != "third"]

        self.variant(self.files.relay_config, "relay.yaml", without_third)
        argv = twist("arc-relay", self.files.relay_config) + ["--reload-interval",
                                                              str(self.interval)]
        self.add("relay", argv)
        wait_for(lambda: port_in_use(self.files.relay_port), 20, "the relay to listen",
                 alive=self.parts["relay"])

    def agent_token_file(self, cluster):
        return os.path.join(self.files.state_dir, cluster + "-agent.token")

    def start_cluster_agent(self, cluster):
        token_file = self.agent_token_file(cluster)
        config = self.variant(self.files.agent_config, "agent-%s.yaml" % cluster, lambda c: (
            c.update(cluster=cluster), c["relay"].update(token_file=token_file)))
        return self.start_agent(config, name="agent-" + cluster)

    def reaches(self, cluster):
        return self.kubectl("get", "--raw", "/version", context=cluster,
                            check=False).returncode == 0

    def relay_log(self):
        return self.parts["relay"].output()


class ReloadProcessTests(unittest.TestCase):
    timeout = 240

    def start(self, interval):
        base = tempfile.mkdtemp(prefix="arc-reload-it-")
        chain = self.chain = ReloadChain(base, interval)
        self.addCleanup(chain.stop)
        chain.start()
        chain.start_cluster_agent("other")
        wait_for(lambda: chain.reaches("other"), 30, "kubectl to reach cluster other")
        return chain

    def arc(self, *args, check=True):
        argv = [sys.executable, "-c", "import sys; from arc.cli.main import main; "
                                      "sys.exit(main())"] + list(args)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, ARC_RELAY_CONFIG=self.chain.files
                                         .relay_config))
        if check and result.returncode != 0:
            self.fail("arc %s failed (%d): %s" % (" ".join(args), result.returncode,
                                                  result.stderr))
        return result

    def wait_reloads(self, n, timeout=20):
        wait_for(lambda: self.chain.relay_log().count("relay configuration reloaded") >= n,
                 timeout, "reload number %d in the relay log" % n, alive=self.chain.parts["relay"])

    def assertTunnelsUpOnce(self, *clusters):
        log = self.chain.relay_log()
        for cluster in clusters:
            self.assertEqual(log.count(AGENT_UP % cluster), 1, "cluster %s: %s" % (
                cluster, "\n".join(re.findall(r".*agent tunnel .*", log))))
        self.assertEqual(log.count("client tunnel up:"), 1)

    def test_file_changes_apply_without_dropping_tunnels(self):
        chain = self.start(interval=0.5)
        refused = chain.kubectl("get", "--raw", "/version", context="third", check=False)
        self.assertIn("not registered", refused.stderr)

        # A new cluster and its binding become usable; nothing else moves.
        token = self.arc("cluster", "add", "third", "--group", "demo-team").stdout.strip()
        with open(chain.agent_token_file("third"), "w") as f:
            f.write(token + "\n")
        self.wait_reloads(1)
        chain.start_cluster_agent("third")
        wait_for(lambda: chain.reaches("third"), 30, "kubectl to reach the new cluster third")
        self.assertTrue(chain.reaches("demo"))

        # A removed cluster's agent is disconnected and refused from then on.
        self.arc("cluster", "remove", "other")
        self.wait_reloads(2)
        wait_for(lambda: "agent tunnel down: cluster=other" in chain.relay_log(), 10,
                 "the agent of the removed cluster to be disconnected")
        wait_for(lambda: "relay rejected the agent credential" in
                 chain.parts["agent-other"].output(), 40, "the removed agent to be refused")
        gone = chain.kubectl("get", "--raw", "/version", context="other", check=False)
        self.assertIn("not registered", gone.stderr)

        # A bad file is refused with one line; the running registry stays.
        with open(chain.files.relay_config) as f:
            config = yaml.safe_load(f)
        config["bindings"].append({"cluster": "ghost", "groups": ["demo-team"]})
        with open(chain.files.relay_config, "w") as f:
            yaml.safe_dump(config, f)
        wait_for(lambda: "not reloaded" in chain.relay_log(), 20, "the bad file to be refused")
        time.sleep(2)  # several more polls: still one line
        refusals = [line for line in chain.relay_log().splitlines() if "not reloaded" in line]
        self.assertEqual(len(refusals), 1, refusals)
        self.assertIn(chain.files.relay_config, refusals[0])
        self.assertIn("bindings[", refusals[0])
        self.assertIn("'ghost' is not listed under clusters", refusals[0])
        self.assertTrue(chain.reaches("third"))
        self.assertTrue(chain.reaches("demo"))

        self.assertTunnelsUpOnce("demo", "third")
        self.assertEqual(chain.relay_log().count("agent tunnel down: cluster=demo"), 0)

    def test_sighup_and_token_rotation(self):
        chain = self.start(interval=0)
        token = self.arc("cluster", "rotate-token", "other").stdout.strip()
        os.kill(chain.parts["relay"].pid, signal.SIGHUP)
        self.wait_reloads(1)
        self.assertIn("relay configuration reloaded (SIGHUP)", chain.relay_log())
        wait_for(lambda: "agent tunnel down: cluster=other" in chain.relay_log(), 10,
                 "the agent with the old token to be disconnected")
        self.assertTrue(chain.reaches("demo"))

        # The agent re-reads its token file at each attempt: the new token lets it in.
        with open(chain.agent_token_file("other"), "w") as f:
            f.write(token + "\n")
        wait_for(lambda: chain.reaches("other"), 60, "the agent with the new token to return")
        self.assertTunnelsUpOnce("demo")
        self.assertEqual(chain.relay_log().count(AGENT_UP % "other"), 2)

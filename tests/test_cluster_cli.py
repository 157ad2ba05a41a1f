"""``arc cluster add|list|remove|rotate-token`` on a copy of etc/relay.yaml."""

import contextlib
import io
import os
import stat
import subprocess
import sys
import tempfile

import yaml
from twisted.trial import unittest

from arc.cli import cluster
from arc.cli.main import CommandError, main
from arc.relay.config import load_relay_config
from arc.relay.registry import Identity, token_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ClusterCommandTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="arc-cluster-")
        for name in ("relay.crt", "relay.key"):
            open(os.path.join(self.dir, name), "w").close()
        self.path = os.path.join(self.dir, "relay.yaml")
        with open(os.path.join(ROOT, "etc", "relay.yaml")) as f:
            self.original = f.read()
        with open(self.path, "w") as f:
            f.write(self.original)
        os.chmod(self.path, 0o640)

    def arc(self, *args, code=0):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = main(["cluster"] + list(args) + ["--relay-config", self.path])
        self.assertEqual(result, code, err.getvalue())
        return out.getvalue(), err.getvalue()

    def registry(self):
        return load_relay_config(self.path).registry

    def text(self):
        with open(self.path) as f:
            return f.read()

    # -- add --------------------------------------------------------------------------

    def test_add_prints_only_the_token_and_stores_its_hash(self):
        out, err = self.arc("add", "dev", "--group", "ops", "--user", "bob", "--group", "ops")
        token = out.strip()
        self.assertEqual(out, token + "\n")
        self.assertGreaterEqual(len(token), 43)
        self.assertNotIn(token, err)
        self.assertNotIn(token, self.text())
        registry = self.registry()
        self.assertTrue(registry.agent_ok("dev", token))
        self.assertTrue(registry.allowed(Identity("bob"), "dev"))
        self.assertTrue(registry.allowed(Identity("x", ("ops",)), "dev"))
        self.assertFalse(registry.allowed(Identity("alice", ("platform",)), "dev"))
        # The rest of the file is kept.
        self.assertEqual(sorted(registry.clusters), ["dev", "prod-eu", "staging"])
        self.assertEqual(registry.clusters["prod-eu"], "0" * 64)
        self.assertTrue(registry.allowed(Identity("alice", ("platform",)), "prod-eu"))
        self.assertEqual(load_relay_config(self.path).listen, "tcp:8443:interface=0.0.0.0")
        with open(self.path) as f:
            bindings = yaml.safe_load(f)["bindings"]
        self.assertEqual(bindings[-1], {"cluster": "dev", "users": ["bob"], "groups": ["ops"]})
        self.assertIn("registered cluster dev", err)
        self.assertIn("comments are not kept", self.text())

    def test_add_keeps_a_backup_and_the_mode(self):
        self.arc("add", "dev")
        with open(self.path + ".bak") as f:
            self.assertEqual(f.read(), self.original)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        self.assertEqual(stat.S_IMODE(os.stat(self.path + ".bak").st_mode), 0o640)
        self.assertEqual(sorted(os.listdir(self.dir)),
                         ["relay.crt", "relay.key", "relay.yaml", "relay.yaml.bak"])

    def test_add_without_binding_says_nobody_may_reach_it(self):
        _, err = self.arc("add", "dev")
        self.assertIn("nobody may reach it yet", err)
        self.assertNotIn("dev", self.registry().bindings)

    def test_add_existing_cluster_is_refused_and_file_unchanged(self):
        _, err = self.arc("add", "staging", code=1)
        self.assertIn("'staging' is already registered", err)
        self.assertIn("rotate-token staging", err)
        self.assertEqual(self.text(), self.original)
        self.assertFalse(os.path.exists(self.path + ".bak"))

    def test_add_bad_name(self):
        _, err = self.arc("add", "Prod_EU", code=1)
        self.assertIn("must be a DNS label", err)
        self.assertEqual(self.text(), self.original)

    def test_file_the_relay_would_refuse_is_not_edited(self):
        broken = self.original.replace("cluster: staging", "cluster: ghost")
        with open(self.path, "w") as f:
            f.write(broken)
        _, err = self.arc("add", "dev", code=1)
        self.assertIn("bindings[1].cluster", err)
        self.assertIn("fix it first", err)
        self.assertEqual(self.text(), broken)

    def test_missing_file(self):
        os.unlink(self.path)
        _, err = self.arc("list", code=1)
        self.assertIn("does not exist", err)
        self.assertIn("--relay-config", err)

    def test_problem_outside_the_registry_is_tolerated_but_not_worsened(self):
        """A configuration kept away from the relay's host (TLS files absent)."""
        os.unlink(os.path.join(self.dir, "relay.key"))
        out, err = self.arc("add", "dev", "--group", "ops")
        self.assertIn("does not load completely on this machine", err)
        open(os.path.join(self.dir, "relay.key"), "w").close()
        self.assertTrue(self.registry().agent_ok("dev", out.strip()))

    def test_candidate_that_would_not_load_leaves_the_file_alone(self):
        data = yaml.safe_load(self.original)
        data["bindings"].append({"cluster": "ghost", "groups": ["x"]})
        with self.assertRaises(CommandError) as caught:
            cluster._replace(self.path, data)
        self.assertIn("%s: bindings[2].cluster" % (self.path,), str(caught.exception))
        self.assertIn("is unchanged", str(caught.exception))
        self.assertEqual(self.text(), self.original)
        self.assertEqual(sorted(os.listdir(self.dir)), ["relay.crt", "relay.key", "relay.yaml"])

    # -- list, remove, rotate-token -----------------------------------------------------

    def test_list(self):
        out, _ = self.arc("list")
        self.assertEqual(out.splitlines(), [
            "CLUSTER  USERS  GROUPS",
            "prod-eu  -      platform",
            "staging  alice  ci",
        ])

    def test_remove_drops_cluster_and_its_bindings(self):
        _, err = self.arc("remove", "staging")
        registry = self.registry()
        self.assertEqual(sorted(registry.clusters), ["prod-eu"])
        self.assertEqual(sorted(registry.bindings), ["prod-eu"])
        self.assertIn("1 access binding from", err)
        self.assertNotIn("staging", self.text())
        self.arc("remove", "prod-eu")
        self.assertEqual(self.registry().clusters, {})

    def test_remove_unknown(self):
        _, err = self.arc("remove", "nope", code=1)
        self.assertIn("'nope' is not registered", err)
        self.assertIn("registered: prod-eu, staging", err)

    def test_rotate_token_replaces_the_hash(self):
        first, _ = self.arc("add", "dev", "--group", "ops")
        second, err = self.arc("rotate-token", "dev")
        first, second = first.strip(), second.strip()
        self.assertNotEqual(first, second)
        registry = self.registry()
        self.assertTrue(registry.agent_ok("dev", second))
        self.assertFalse(registry.agent_ok("dev", first))
        self.assertTrue(registry.allowed(Identity("x", ("ops",)), "dev"))
        self.assertNotIn(token_digest(first), self.text())
        self.assertIn("old token no longer works", err)

    def test_concurrent_adds_lose_nothing(self):
        procs = [subprocess.Popen(
            [sys.executable, "-c", "import sys; from arc.cli.main import main; sys.exit(main())",
             "cluster", "add", "c%d" % i, "--relay-config", self.path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT) for i in range(6)]
        tokens = {}
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 0, err)
            tokens["c%d" % i] = out.decode().strip()
        registry = self.registry()
        for name, token in tokens.items():
            self.assertTrue(registry.agent_ok(name, token), name)


class ConsoleScriptTests(unittest.TestCase):
    def test_stdout_is_the_token_alone(self):
        """What a pipe into `kubectl create secret --from-file=token=/dev/stdin` receives."""
        base = tempfile.mkdtemp(prefix="arc-cluster-")
        for name in ("relay.crt", "relay.key"):
            open(os.path.join(base, name), "w").close()
        path = os.path.join(base, "relay.yaml")
        with open(os.path.join(ROOT, "etc", "relay.yaml")) as src, open(path, "w") as f:
            f.write(src.read())
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from arc.cli.main import main; sys.exit(main())",
             "cluster", "add", "dev", "--group", "ops"], capture_output=True, text=True,
            timeout=60, cwd=ROOT, env=dict(os.environ, ARC_RELAY_CONFIG=path))
        self.assertEqual(result.returncode, 0, result.stderr)
        token = result.stdout.strip()
        self.assertEqual(result.stdout, token + "\n")
        self.assertRegex(token, r"^[A-Za-z0-9_-]{43}$")
        self.assertIn("registered cluster dev", result.stderr)
        self.assertTrue(load_relay_config(path).registry.agent_ok("dev", token))

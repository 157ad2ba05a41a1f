"""``arc connect`` / ``status`` / ``disconnect`` as a CI job would use them.

Two clusters (two agents, two API server emulators) behind one relay; one
client daemon started by ``arc connect`` serves both.  kubectl uses only
the exec credential plugin entry ``arc connect`` wrote (the token comes
from an environment variable: CI mode), and after ``arc disconnect --all``
no process is left.
"""

import json
import os
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from arc import demo
from arc.testing.procs import free_port, start_apiserver, wait_for
from tests.chain import Chain

API_TOKENS = ["%s=%s" % (demo.GUARD_TOKEN, demo.GUARD_USER),
              "%s=admin:system:masters" % demo.API_TOKEN]


class ConnectTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        base = self.base = tempfile.mkdtemp(prefix="arc-connect-")
        chain = self.chain = Chain(base, api_tokens=API_TOKENS,
                                   api_extra=["--impersonator", demo.GUARD_USER],
                                   guard="static", extra_clusters=("other",), with_client=False)
        self.addCleanup(chain.stop)
        chain.start()
        api2 = start_apiserver(base, name="api2", tokens=API_TOKENS,
                               extra=["--impersonator", demo.GUARD_USER])
        chain.parts["api2"] = api2
        files = chain.files
        config = chain.variant(files.agent_config, "agent-other.yaml", lambda c: (
            c.update(cluster="other"),
            c["relay"].update(token_file=os.path.join(files.state_dir, "other-agent.token")),
            c["upstream"].update(kubeconfig=api2.kubeconfig)))
        chain.start_agent(config, name="agent-other")
        with open(files.user_token_file) as f:
            token = f.read().strip()
        self.kubeconfig = os.path.join(base, "kubeconfig")
        self.env = dict(os.environ, ARC_CONFIG_DIR=os.path.join(base, "arc-config"),
                        KUBECONFIG=self.kubeconfig, ARC_CI_TOKEN=token)
        self.addCleanup(self.arc, "disconnect", "--all", check=False)

    def arc(self, *args, check=True):
        result = subprocess.run([sys.executable, "-m", "arc.cli.main"] + list(args),
                                env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            self.fail("arc %s failed (%d): %s%s" % (" ".join(args), result.returncode,
                                                    result.stdout, result.stderr))
        return result

    def kubectl(self, *args, check=True):
        result = subprocess.run([self.chain.kubectl_bin, "--cache-dir",
                                 os.path.join(self.base, "cache")] + list(args),
                                env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            self.fail("kubectl %s failed: %s" % (" ".join(args), result.stderr))
        return result

    def daemon_pid(self):
        path = os.path.join(self.env["ARC_CONFIG_DIR"], "client.pid")
        with open(path) as f:
            return int(f.read())

    def test_two_clusters_one_daemon_ci_mode(self):
        relay = "https://localhost:%d" % self.chain.files.relay_port
        ca = os.path.join(self.chain.files.state_dir, "relay-ca.crt")
        listen = "tcp:%d:interface=127.0.0.1" % free_port()
        self.arc("connect", "demo", "--relay", relay, "--ca-file", ca,
                 "--token-env", "ARC_CI_TOKEN", "--listen", listen, "--set-current")
        pid = self.daemon_pid()
        self.arc("connect", "other", "--token-env", "ARC_CI_TOKEN")
        self.assertEqual(self.daemon_pid(), pid, "one daemon serves both clusters")

        # The contexts use the exec credential plugin, nothing else.
        with open(self.kubeconfig) as f:
            text = f.read()
        self.assertIn("exec:", text)
        self.assertNotIn(self.env["ARC_CI_TOKEN"], text)
        self.assertNotIn("tokenFile", text)

        for context in ("demo", "other"):
            out = self.kubectl("--context", context, "auth", "whoami", "-o", "json").stdout
            self.assertEqual(json.loads(out)["status"]["userInfo"]["username"], demo.USER)
        self.assertIn("ticker", self.kubectl("get", "pods").stdout)
        self.kubectl("config", "use-context", "other")
        self.assertIn("ticker", self.kubectl("get", "pods").stdout)

        status = json.loads(self.arc("status", "-o", "json").stdout)
        self.assertEqual(status["tunnel"], "up")
        self.assertEqual(sorted(c["name"] for c in status["clusters"]), ["demo", "other"])

        self.arc("disconnect", "other")
        status = json.loads(self.arc("status", "-o", "json").stdout)
        self.assertEqual([c["name"] for c in status["clusters"]], ["demo"])
        self.assertNotIn("name: other", open(self.kubeconfig).read())

        self.arc("disconnect", "--all")
        wait_for(lambda: not _alive(pid), 15, "the daemon to exit")
        result = self.arc("status", check=False)
        self.assertEqual(result.returncode, 1)
        self.assertIn("no arc client daemon is running", result.stderr)

    def test_not_logged_in_and_no_relay(self):
        result = self.arc("connect", "demo", "--token-env", "ARC_CI_TOKEN", check=False)
        self.assertEqual(result.returncode, 1)
        self.assertIn("give --relay", result.stderr)
        result = self.arc("connect", "demo", "--relay", "https://localhost:1", check=False)
        self.assertEqual(result.returncode, 1)
        self.assertIn("arc login", result.stderr)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


class PortInUseTests(unittest.TestCase):
    def test_port_in_use_is_one_clear_line(self):
        import socket
        base = tempfile.mkdtemp(prefix="arc-port-")
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        self.addCleanup(holder.close)
        token = os.path.join(base, "token")
        with open(token, "w") as f:
            f.write("t\n")
        env = dict(os.environ, ARC_CONFIG_DIR=os.path.join(base, "cfg"),
                   KUBECONFIG=os.path.join(base, "kubeconfig"))
        result = subprocess.run(
            [sys.executable, "-m", "arc.cli.main", "connect", "demo", "--relay",
             "https://localhost:1", "--token-file", token, "--listen",
             "tcp:%d:interface=127.0.0.1" % holder.getsockname()[1]],
            env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("is already in use", lines[0])
        self.assertIn("--listen", lines[0])


class TokenCommandTests(unittest.TestCase):
    def test_output_forms(self):
        from arc.tunnel.credentials import token_from_output
        self.assertEqual(token_from_output("abc\n"), "abc")
        cred = json.dumps({"apiVersion": "client.authentication.k8s.io/v1",
                           "kind": "ExecCredential", "status": {"token": "xyz"}})
        self.assertEqual(token_from_output(cred), "xyz")
        for bad in ("", "two tokens", '{"status": {}}'):
            with self.assertRaises(ValueError):
                token_from_output(bad)


class ConnectWithTokenCommandTests(ConnectTests):
    """CI mode with the token from a command, for relay tunnel and kubectl alike."""

    def test_two_clusters_one_daemon_ci_mode(self):
        pass  # covered by ConnectTests

    def test_not_logged_in_and_no_relay(self):
        pass  # covered by ConnectTests

    def test_token_command(self):
        relay = "https://localhost:%d" % self.chain.files.relay_port
        ca = os.path.join(self.chain.files.state_dir, "relay-ca.crt")
        listen = "tcp:%d:interface=127.0.0.1" % free_port()
        command = "cat %s" % self.chain.files.user_token_file
        self.arc("connect", "demo", "--relay", relay, "--ca-file", ca,
                 "--token-command", command, "--listen", listen, "--set-current")
        out = self.kubectl("auth", "whoami", "-o", "json").stdout
        self.assertEqual(json.loads(out)["status"]["userInfo"]["username"], demo.USER)
        with open(os.path.join(self.env["ARC_CONFIG_DIR"], "client.yaml")) as f:
            self.assertIn("token_command", f.read())
        pid = self.daemon_pid()
        self.arc("disconnect", "--all")
        wait_for(lambda: not _alive(pid), 15, "the daemon to exit")

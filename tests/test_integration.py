"""kubectl through the whole chain: real processes, real kubectl.

The chain (API emulator, relay, agent, client) starts once per class; the
same tests run over both carriers (direct upgrade and WebSocket).
"""

import atexit
import os
import socket
import tempfile
import time
import unittest as pyunit

from twisted.trial import unittest

from tests.chain import API_TOKEN, Chain, free_port, read_until, wait_for

CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}
  namespace: default
data:
  colour: {colour}
"""

POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
spec:
  containers:
  - name: main
    image: busybox:1.36
"""


class ChainMixin:
    """One chain per test class: started by the first test, stopped after the last."""

    transport = "tunnel"
    chain = None

    def setUp(self):
        cls = type(self)
        if cls.chain is None:
            cls.remaining = len(pyunit.TestLoader().getTestCaseNames(cls))
            cls.base = tempfile.mkdtemp(prefix="arc-it-")
            chain = cls.make_chain(cls.base)
            atexit.register(chain.stop)
            try:
                chain.start()
            except BaseException:
                chain.stop()
                raise
            cls.chain = chain
        self.addCleanup(self._release)

    @classmethod
    def make_chain(cls, base):
        return Chain(base, transport=cls.transport)

    def _release(self):
        cls = type(self)
        cls.remaining -= 1
        if cls.remaining <= 0 and cls.chain is not None:
            cls.chain.stop()
            cls.chain = None

    def kubectl(self, *args, **kw):
        return self.chain.kubectl(*args, **kw)


class KubectlTestsMixin(ChainMixin):
    def test_get_pods(self):
        out = self.kubectl("get", "pods").stdout
        self.assertIn("ticker", out)
        self.assertIn("NAME", out)

    def test_auth_whoami(self):
        out = self.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout
        self.assertEqual(out.strip(), "admin")

    def test_apply_get_delete(self):
        name = "cm-" + self.transport
        manifest = CONFIGMAP.format(name=name, colour="blue")
        out = self.kubectl("apply", "-f", "-", stdin=manifest).stdout
        self.assertIn("configmap/%s" % name, out)
        colour = self.kubectl("get", "configmap", name, "-o", "jsonpath={.data.colour}").stdout
        self.assertEqual(colour, "blue")
        self.kubectl("apply", "-f", "-", stdin=CONFIGMAP.format(name=name, colour="green"))
        colour = self.kubectl("get", "configmap", name, "-o", "jsonpath={.data.colour}").stdout
        self.assertEqual(colour, "green")
        self.kubectl("delete", "configmap", name)
        gone = self.kubectl("get", "configmap", name, check=False)
        self.assertNotEqual(gone.returncode, 0)
        self.assertIn("not found", gone.stderr.lower())

    def test_watch_sees_new_pod(self):
        name = "watched-" + self.transport
        watch = self.chain.kubectl_background("get", "pods", "-w", "-o", "name")
        try:
            read_until(watch, lambda text: "pod/ticker" in text, 30)
            self.kubectl("apply", "-f", "-", stdin=POD.format(name=name))
            text = read_until(watch, lambda text: "pod/" + name in text, 30)
            self.assertIn("pod/" + name, text)
        finally:
            watch.kill()
            watch.wait(10)
            self.kubectl("delete", "pod", name, check=False)

    def test_logs_follow(self):
        logs = self.chain.kubectl_background("logs", "-f", "ticker")
        try:
            # Lines keep arriving while the stream stays open.
            first = read_until(logs, lambda text: text.count("\n") >= 2, 30)
            more = read_until(logs, lambda text: text.count("\n") >= 2, 30)
            self.assertTrue(first.strip() and more.strip())
            self.assertIsNone(logs.poll(), "logs -f ended on its own")
        finally:
            logs.kill()
            logs.wait(10)

    def test_exec_stdout(self):
        out = self.kubectl("exec", "ticker", "--", "echo", "hello", "through", "arc").stdout
        self.assertEqual(out.strip(), "hello through arc")

    def test_exec_stdin(self):
        data = "line one\nline two\n" * 100
        out = self.kubectl("exec", "-i", "ticker", "--", "cat", stdin=data).stdout
        self.assertEqual(out, data)

    def test_exec_exit_code(self):
        result = self.kubectl("exec", "ticker", "--", "sh", "-c", "exit 3", check=False)
        self.assertEqual(result.returncode, 3)


    def test_exec_over_spdy(self):
        env = dict(os.environ, KUBECTL_REMOTE_COMMAND_WEBSOCKETS="false")
        out = self.kubectl("exec", "-i", "ticker", "--", "cat", stdin="spdy stdin\n",
                           env=env).stdout
        self.assertEqual(out, "spdy stdin\n")
        result = self.kubectl("exec", "ticker", "--", "sh", "-c", "exit 4", check=False,
                              env=env)
        self.assertEqual(result.returncode, 4)

    def test_exec_with_kubectl_1_29(self):
        """kubectl 1.29 speaks only SPDY for exec."""
        old = os.path.join(os.path.dirname(self.chain.kubectl_bin), "kubectl.1.29")
        if not os.path.exists(old):
            self.fail("kubectl.1.29 is missing beside %s" % (self.chain.kubectl_bin,))
        out = self.kubectl("exec", "ticker", "--", "echo", "old", "kubectl", binary=old).stdout
        self.assertEqual(out.strip(), "old kubectl")

    def test_attach(self):
        out = self.kubectl("attach", "-i", "ticker", stdin="attached line\n").stdout
        self.assertIn("attached line", out)

    def test_cp_both_ways(self):
        local = os.path.join(self.base, "cp-%s.bin" % self.transport)
        data = os.urandom(50000)
        with open(local, "wb") as f:
            f.write(data)
        self.kubectl("cp", local, "ticker:/tmp/copied.bin")
        back = local + ".back"
        self.kubectl("cp", "ticker:/tmp/copied.bin", back)
        with open(back, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_port_forward(self):
        for env in ({}, {"KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}):
            port = free_port()
            forward = self.chain.kubectl_background(
                "port-forward", "pod/ticker", "%d:8080" % port,
                env=dict(os.environ, **env))
            try:
                read_until(forward, lambda text: "Forwarding from" in text, 30)
                with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                    answer = b""
                    while b"hello from" not in answer:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        answer += chunk
                self.assertIn(b"hello from ticker:8080", answer, env)
            finally:
                forward.kill()
                forward.wait(10)


class KubectlOverTunnel(KubectlTestsMixin, unittest.TestCase):
    transport = "tunnel"


class KubectlOverWebSocket(KubectlTestsMixin, unittest.TestCase):
    transport = "websocket"


class FailureTests(ChainMixin, unittest.TestCase):
    """Refusals and outages: kubectl gets a clear Status, never a hang."""

    def test_agent_restart(self):
        chain = self.chain
        chain.parts["agent"].kill()
        started = time.monotonic()
        result = self.kubectl("get", "pods", "--request-timeout=60s", check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("cluster 'demo' is offline", result.stderr)
        self.assertIn("ServiceUnavailable", result.stderr)
        self.assertLess(time.monotonic() - started, 15)
        chain.start_agent()
        wait_for(lambda: self.kubectl("get", "pods", check=False).returncode == 0, 20,
                 "kubectl to work again after the agent restarted")
        self.assertIn("ticker", self.kubectl("get", "pods").stdout)

    def test_wrong_agent_token(self):
        chain = self.chain
        bad_token = os.path.join(self.base, "bad-agent.token")
        with open(bad_token, "w") as f:
            f.write("not-the-agent-token-4711\n")
        config = chain.variant(chain.files.agent_config, "agent-bad.yaml",
                               lambda c: c["relay"].update(token_file=bad_token))
        part = chain.start_agent(config, name="agent-bad")
        try:
            wait_for(lambda: "agent token rejected for cluster 'demo'" in part.output(), 20,
                     "the agent to log the refusal")
            wait_for(lambda: "wrong or missing token for cluster demo"
                     in chain.parts["relay"].output(), 10, "the relay to log the refusal")
        finally:
            part.stop()
        for log in (part.output(), chain.parts["relay"].output()):
            self.assertNotIn("not-the-agent-token-4711", log)

    def _client_variant(self, name, change):
        chain = self.chain
        kubeconfig = os.path.join(self.base, name + ".kubeconfig")
        port = __import__("tests.chain", fromlist=["free_port"]).free_port()

        def edit(c):
            c["kubeconfig"] = kubeconfig
            c["listen"] = "tcp:%d:interface=127.0.0.1" % port
            c["state_dir"] = os.path.join(self.base, name + "-state")
            change(c)

        config = chain.variant(chain.files.client_config, name + ".yaml", edit)
        part = chain.start_client(config, name=name)
        self.addCleanup(part.stop)
        wait_for(lambda: os.path.exists(kubeconfig), 20, "the client to write its kubeconfig")
        return part, kubeconfig

    def test_wrong_user_token(self):
        bad = os.path.join(self.base, "bad-user.token")
        with open(bad, "w") as f:
            f.write("user-token-that-is-wrong-0815\n")
        part, kubeconfig = self._client_variant(
            "client-bad-token", lambda c: c["relay"].update(token_file=bad))
        wait_for(lambda: "user token rejected" in part.output(), 20,
                 "the client to log the refusal")
        result = self.kubectl("get", "pods", kubeconfig=kubeconfig, check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("user token rejected", result.stderr)
        relay_log = self.chain.parts["relay"].output()
        self.assertIn("unknown or missing user token", relay_log)
        for log in (part.output(), relay_log):
            self.assertNotIn("user-token-that-is-wrong-0815", log)

    def test_unknown_cluster(self):
        part, kubeconfig = self._client_variant(
            "client-unknown", lambda c: c["clusters"].append(
                {"name": "nowhere", "token_file": self.chain.token_file}))
        result = self.kubectl("get", "pods", kubeconfig=kubeconfig, context="nowhere",
                              check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("cluster 'nowhere' is not registered at the relay", result.stderr)
        self.assertIn("Forbidden", result.stderr)
        # The same client still reaches the known cluster.
        ok = self.kubectl("get", "pods", kubeconfig=kubeconfig, context="demo")
        self.assertIn("ticker", ok.stdout)


class UnboundUserTests(unittest.TestCase):
    """A user the relay knows but no binding names."""

    def test_user_not_bound(self):
        base = tempfile.mkdtemp(prefix="arc-it-")
        chain = Chain(base, extra_clusters=("other",))
        self.addCleanup(chain.stop)
        chain.start()
        # Bind the demo user to 'demo' only, then ask for 'other'.
        config = chain.variant(chain.files.relay_config, "relay.yaml", lambda c: c.update(
            bindings=[{"cluster": "demo", "users": ["demo-user"]},
                      {"cluster": "other", "users": ["someone-else"]}]))
        chain.parts["relay"].stop()
        chain.start_relay()
        chain.wait_ready()
        result = chain.kubectl("get", "pods", context="other", check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("user 'demo-user' may not reach cluster 'other'", result.stderr)
        self.assertIn("Forbidden", result.stderr)
        self.assertIn("not bound to cluster other", chain.parts["relay"].output())
        self.assertTrue(os.path.exists(config))
        self.assertNotIn(API_TOKEN, chain.parts["relay"].output())

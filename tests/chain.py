"""Real processes for integration tests: API emulator, relay, agent, client.

Everything runs on 127.0.0.1 with ports picked free at start.  Each part is
started the way a user starts it (``python -m twisted arc-PART --config
FILE``), logs to a file in the test's directory, and is stopped by the
test's cleanup.  Waits are polls bounded in time.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import yaml

from arc import demo

API_TOKEN = "integration-admin-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubectl_binary():
    """kubectl 1.33 when it lies beside the kubectl on PATH, else kubectl."""
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl is not on PATH: install it to run the integration tests")
    versioned = os.path.join(os.path.dirname(os.path.realpath(found)), "kubectl.1.33")
    return versioned if os.path.exists(versioned) else found


def wait_for(predicate, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


class Part:
    """One process, logging to ``log``."""

    def __init__(self, name, argv, log, env=None):
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.proc = None

    def start(self):
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=os.path.dirname(self.log),
                                     env=self.env)
        out.close()
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if not self.running():
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self):
        self.stop(signal.SIGKILL)

    def output(self):
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace")


def twist(plugin, config):
    return [sys.executable, "-m", "twisted", "--log-format=text", plugin, "--config", config]


class Chain:
    """The whole chain in ``base`` (a fresh directory)."""

    def __init__(self, base, *, transport="tunnel", extra_clusters=(), tunnel=None):
        self.base = base
        self.parts = {}
        self.api_dir = os.path.join(base, "api")
        self.cache = os.path.join(base, "kube-cache")
        self.token_file = os.path.join(base, "api.token")
        with open(self.token_file, "w") as f:
            f.write(API_TOKEN + "\n")
        self.kubectl_bin = kubectl_binary()
        self.transport = transport
        self.extra_clusters = extra_clusters
        self.tunnel = tunnel
        self.files = None

    # -- parts ------------------------------------------------------------------

    def add(self, name, argv):
        part = Part(name, argv, os.path.join(self.base, name + ".log"))
        self.parts[name] = part
        return part.start()

    def start_api(self):
        argv = [sys.executable, "-m", "arc.testing.apiserver", "--state-dir", self.api_dir,
                "--token", "%s=admin:system:masters" % API_TOKEN,
                "--request-log", os.path.join(self.base, "api-requests.jsonl")]
        self.add("api", argv)
        port_file = os.path.join(self.api_dir, "port")
        wait_for(lambda: os.path.exists(port_file) and open(port_file).read().strip(), 20,
                 "the API server emulator to listen")
        wait_for(lambda: os.path.exists(os.path.join(self.api_dir, "kubeconfig")), 5,
                 "the emulator's kubeconfig")

    def start(self):
        self.start_api()
        self.files = demo.prepare(
            os.path.join(self.base, "arc"), relay_port=free_port(), client_port=free_port(),
            upstream_kubeconfig=os.path.join(self.api_dir, "kubeconfig"),
            api_token_file=self.token_file, transport=self.transport,
            extra_clusters=self.extra_clusters, tunnel=self.tunnel)
        self.start_relay()
        self.start_agent()
        self.start_client()
        self.wait_ready()
        return self

    def start_relay(self):
        self.add("relay", twist("arc-relay", self.files.relay_config))
        wait_for(lambda: _connectable(self.files.relay_port), 20, "the relay to listen")

    def start_agent(self, config=None, name="agent"):
        return self.add(name, twist("arc-agent", config or self.files.agent_config))

    def start_client(self, config=None, name="client"):
        part = self.add(name, twist("arc-client", config or self.files.client_config))
        return part

    def wait_ready(self, timeout=30):
        wait_for(lambda: self.kubectl("get", "--raw", "/version", check=False).returncode == 0,
                 timeout, "kubectl to answer through the chain")

    def stop(self):
        for part in reversed(list(self.parts.values())):
            part.stop()

    # -- configs --------------------------------------------------------------

    def variant(self, source, name, change):
        """A copy of a YAML config with ``change(dict)`` applied."""
        with open(source) as f:
            data = yaml.safe_load(f)
        change(data)
        path = os.path.join(os.path.dirname(source), name)
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        return path

    # -- kubectl ----------------------------------------------------------------

    def kubectl(self, *args, kubeconfig=None, stdin=None, timeout=60, check=True, context=None):
        argv = [self.kubectl_bin, "--kubeconfig", kubeconfig or self.files.kubeconfig,
                "--cache-dir", self.cache]
        if context:
            argv += ["--context", context]
        result = subprocess.run(argv + list(args), input=stdin, capture_output=True,
                                timeout=timeout, text=True)
        if check and result.returncode != 0:
            raise AssertionError("kubectl %s failed (%d): %s%s" % (
                " ".join(args), result.returncode, result.stdout, result.stderr))
        return result

    def kubectl_background(self, *args):
        argv = [self.kubectl_bin, "--kubeconfig", self.files.kubeconfig,
                "--cache-dir", self.cache] + list(args)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)


def _connectable(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def read_until(proc, predicate, timeout):
    """Read ``proc.stdout`` lines until ``predicate(text so far)``; bounded."""
    import selectors
    text = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not predicate(text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out after %.0f s; output so far: %r" % (timeout, text))
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError("process ended; output: %r" % (text,))
                text += chunk.decode("utf-8", "replace")
    return text

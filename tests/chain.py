"""Real processes for integration tests: API emulator, relay, agent, client.

Everything runs on 127.0.0.1 with ports picked free at start.  Each part is
started the way a user starts it (``python -m twisted arc-PART --config
FILE``), logs to a file in the test's directory, and is stopped by the
test's cleanup.  Waits are polls bounded in time.
"""

import json
import os
import shutil
import subprocess
import time


import yaml

from arc import demo
from arc.testing.procs import Part, free_port, port_in_use, start_apiserver, twist, wait_for

API_TOKEN = "integration-admin-token"


def kubectl_binary():
    """kubectl 1.33 when it lies beside the kubectl on PATH, else kubectl."""
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl is not on PATH: install it to run the integration tests")
    versioned = os.path.join(os.path.dirname(os.path.realpath(found)), "kubectl.1.33")
    return versioned if os.path.exists(versioned) else found


class Chain:
    """The whole chain in ``base`` (a fresh directory)."""

    def __init__(self, base, *, transport="tunnel", extra_clusters=(), tunnel=None,
                 api_tokens=None, api_extra=(), with_client=True, **prepare):
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
        self.api_tokens = api_tokens or ["%s=admin:system:masters" % API_TOKEN]
        self.api_extra = list(api_extra)
        self.prepare = prepare
        self.with_client = with_client
        self.files = None

    # -- parts ------------------------------------------------------------------

    def add(self, name, argv, env=None):
        part = Part(name, argv, os.path.join(self.base, name + ".log"), env=env)
        self.parts[name] = part
        return part.start()

    def start_api(self):
        self.request_log = os.path.join(self.base, "api-requests.jsonl")
        self.parts["api"] = start_apiserver(
            self.base, tokens=self.api_tokens,
            extra=["--request-log", self.request_log] + self.api_extra)

    def start(self):
        self.start_api()
        self.files = demo.prepare(
            os.path.join(self.base, "arc"), relay_port=free_port(), client_port=free_port(),
            upstream_kubeconfig=os.path.join(self.api_dir, "kubeconfig"),
            api_token_file=self.token_file, transport=self.transport,
            extra_clusters=self.extra_clusters, tunnel=self.tunnel, **self.prepare)
        self.start_relay()
        self.start_agent()
        if self.with_client:
            self.start_client()
            self.wait_ready()
        return self

    def start_relay(self):
        self.add("relay", twist("arc-relay", self.files.relay_config))
        wait_for(lambda: port_in_use(self.files.relay_port), 20, "the relay to listen",
                 alive=self.parts["relay"])

    def start_agent(self, config=None, name="agent", env=None):
        return self.add(name, twist("arc-agent", config or self.files.agent_config), env)

    def start_client(self, config=None, name="client", env=None):
        return self.add(name, twist("arc-client", config or self.files.client_config), env)

    def requests(self):
        """What the API server emulator received, one dict per request."""
        with open(self.request_log) as f:
            return [json.loads(line) for line in f if line.strip()]

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

    def kubectl(self, *args, kubeconfig=None, stdin=None, timeout=60, check=True, context=None,
                env=None, binary=None):
        argv = [binary or self.kubectl_bin, "--kubeconfig", kubeconfig or self.files.kubeconfig,
                "--cache-dir", self.cache]
        if context:
            argv += ["--context", context]
        result = subprocess.run(argv + list(args), input=stdin, capture_output=True,
                                timeout=timeout, text=True, env=env)
        if check and result.returncode != 0:
            raise AssertionError("kubectl %s failed (%d): %s%s" % (
                " ".join(args), result.returncode, result.stdout, result.stderr))
        return result

    def kubectl_background(self, *args, env=None):
        argv = [self.kubectl_bin, "--kubeconfig", self.files.kubeconfig,
                "--cache-dir", self.cache] + list(args)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=env)


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

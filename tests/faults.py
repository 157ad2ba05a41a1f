"""What the fault tests share: chains with short timers, and ways to look inside.

:class:`FaultChain` is the integration chain of :mod:`tests.chain` (real
processes on 127.0.0.1) with short keepalive, reconnect and drain settings,
the client's control socket, and optionally :mod:`tests.faultbackend`
servers in place of the API server emulator.  The rest measures what a
fault may leave behind: descriptors and sockets of a process, the relay's
and the client's stream counts, and when log lines appeared.
"""

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import yaml
from twisted.trial import unittest

from arc import demo, pki
from arc.testing.procs import free_port, wait_for
from tests.chain import Chain, read_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FD_TOLERANCE = 2


# -- looking at processes ---------------------------------------------------------


def fd_count(pid):
    """Open file descriptors of process ``pid``."""
    return len(os.listdir("/proc/%d/fd" % pid))


def _socket_inodes(pid):
    inodes = set()
    base = "/proc/%d/fd" % pid
    for name in os.listdir(base):
        try:
            link = os.readlink(os.path.join(base, name))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def tcp_connections(pid):
    """``(local port, remote port)`` of every TCP connection process ``pid`` holds."""
    inodes = _socket_inodes(pid)
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode in inodes and state != "0A":      # 0A: listening
                found.add((int(local.rsplit(":", 1)[1], 16),
                           int(remote.rsplit(":", 1)[1], 16)))
    return found


def settle(measure, baseline, tolerance, timeout, what):
    """Wait until ``measure()`` is back within ``tolerance`` of ``baseline``."""
    values = []

    def back():
        values.append(measure())
        return values[-1] <= baseline + tolerance

    try:
        wait_for(back, timeout, what, interval=0.2)
    except AssertionError:
        raise AssertionError("%s: baseline %d, still %d after %.0f s"
                             % (what, baseline, values[-1], timeout)) from None
    return values[-1]


class LineClock:
    """When lines containing given texts appeared in a log file (polled)."""

    def __init__(self, path):
        self.path = path
        self.offset = os.path.getsize(path)

    def wait(self, texts, timeout):
        """``{text: time.monotonic() when first seen}`` for every text; bounded."""
        seen = {}
        pending = ""
        deadline = time.monotonic() + timeout
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while len(seen) < len(texts):
                chunk = f.read()
                now = time.monotonic()
                if chunk:
                    pending += chunk.decode("utf-8", "replace")
                    lines = pending.split("\n")
                    pending = lines.pop()
                    for line in lines:
                        for text in texts:
                            if text not in seen and text in line:
                                seen[text] = now
                elif now > deadline:
                    missing = sorted(set(texts) - set(seen))
                    raise AssertionError("log %s: no line with %s within %.0f s"
                                         % (self.path, missing, timeout))
                else:
                    time.sleep(0.01)
        return seen


# -- the chain -------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=5):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def write_backend_kubeconfig(path, port, ca_pem):
    data = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "backend", "cluster": {
            "server": "https://127.0.0.1:%d" % port,
            "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": "agent", "user": {"token": "unused-by-passthrough"}}],
        "contexts": [{"name": "backend", "context": {"cluster": "backend", "user": "agent"}}],
        "current-context": "backend",
    }
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


class FaultChain(Chain):
    """The chain with short timers, a control socket, and optional backends.

    ``backends``: names of :mod:`tests.faultbackend` servers to run instead of
    the API server emulator; the first is the default agent's upstream, and
    ``self.backend_kubeconfigs[name]`` points an agent at any of them.
    """

    def __init__(self, base, *, tunnel=None, reconnect=(0.2, 2.0), backends=None, **kw):
        tunnel = dict({"ping_interval": 1, "dead_after": 3}, **(tunnel or {}))
        super().__init__(base, tunnel=tunnel, **kw)
        self.reconnect = reconnect
        self.backends = backends
        self.backend_kubeconfigs = {}
        self.control = os.path.join(base, "client.sock")

    def start_api(self):
        if not self.backends:
            return super().start_api()
        ca, ca_key = pki.new_ca("fault test backend CA")
        cert, key = pki.issue(ca, ca_key, "backend", ips=["127.0.0.1"])
        paths = {}
        for name, pem in (("ca.crt", ca), ("backend.crt", cert), ("backend.key", key)):
            paths[name] = os.path.join(self.base, name)
            pki.write_private(paths[name], pem)
        os.makedirs(self.api_dir, exist_ok=True)
        for name in self.backends:
            port_file = os.path.join(self.base, "backend-%s.port" % name)
            env = dict(os.environ, PYTHONPATH=ROOT)
            part = self.add("backend-" + name,
                            [sys.executable, "-m", "tests.faultbackend",
                             "--cert", paths["backend.crt"], "--key", paths["backend.key"],
                             "--port-file", port_file, "--name", name], env=env)
            wait_for(lambda: os.path.exists(port_file), 20, "backend %s to listen" % name,
                     alive=part)
            with open(port_file) as f:
                port = int(f.read())
            self.backend_kubeconfigs[name] = write_backend_kubeconfig(
                os.path.join(self.base, "backend-%s.kubeconfig" % name), port, ca)
        with open(self.backend_kubeconfigs[self.backends[0]]) as f:
            text = f.read()
        with open(os.path.join(self.api_dir, "kubeconfig"), "w") as f:
            f.write(text)

    def start(self):
        self.start_api()
        self.files = demo.prepare(
            os.path.join(self.base, "arc"), relay_port=free_port(), client_port=free_port(),
            upstream_kubeconfig=os.path.join(self.api_dir, "kubeconfig"),
            api_token_file=self.token_file, transport=self.transport,
            extra_clusters=self.extra_clusters, tunnel=self.tunnel, **self.prepare)
        initial, maximum = self.reconnect

        def agent(c):
            c["relay"].update(reconnect_initial=initial, reconnect_max=maximum)

        def client(c):
            agent(c)
            c["control"] = "unix:" + self.control

        self.variant(self.files.agent_config, "agent.yaml", agent)
        self.variant(self.files.client_config, "client.yaml", client)
        self.start_relay()
        self.start_agent()
        self.start_client()
        self.wait_ready()
        return self

    def agent_config(self, name, cluster=None, upstream=None):
        """A copy of the agent's configuration: another cluster or upstream."""
        def change(c):
            if cluster is not None:
                c["cluster"] = cluster
                c["relay"]["token_file"] = os.path.join(self.files.state_dir,
                                                        cluster + "-agent.token")
            if upstream is not None:
                c["upstream"] = {"kubeconfig": self.backend_kubeconfigs[upstream]}
        return self.variant(self.files.agent_config, name + ".yaml", change)

    # -- looking inside --------------------------------------------------------------

    def relay_health(self):
        ctx = ssl.create_default_context(cafile=os.path.join(self.files.state_dir,
                                                             "relay-ca.crt"))
        conn = http.client.HTTPSConnection("localhost", self.files.relay_port, context=ctx,
                                           timeout=5)
        try:
            conn.request("GET", "/healthz")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def client_status(self):
        conn = UnixHTTPConnection(self.control)
        try:
            conn.request("GET", "/status")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def fds(self, name):
        return fd_count(self.parts[name].pid)

    def signal(self, name, sig):
        os.kill(self.parts[name].pid, sig)

    def cont(self, name):
        if self.parts[name].running():
            os.kill(self.parts[name].pid, signal.SIGCONT)

    def stop(self):
        # A frozen part must run again to handle its SIGTERM.
        for name in self.parts:
            self.cont(name)
        super().stop()

    # -- clients ---------------------------------------------------------------------

    def kubectl_process(self, *args, stdin=False):
        argv = [self.kubectl_bin, "--kubeconfig", self.files.kubeconfig,
                "--cache-dir", self.cache] + list(args)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)

    def proxy_target(self, cluster="demo"):
        """(host, port, server name, CA PEM) of the client proxy, from the kubeconfig."""
        with open(self.files.kubeconfig) as f:
            config = yaml.safe_load(f)
        for entry in config["clusters"]:
            cluster_entry = entry["cluster"]
            if cluster_entry.get("tls-server-name", "").startswith(cluster + "."):
                host, port = cluster_entry["server"].split("//")[1].rsplit(":", 1)
                return (host, int(port), cluster_entry["tls-server-name"],
                        base64.b64decode(cluster_entry["certificate-authority-data"]))
        raise AssertionError("no kubeconfig entry for cluster %r" % (cluster,))

    def raw_get(self, path, cluster="demo", timeout=60, on_head=None):
        """GET ``path`` through the client proxy over a raw TLS socket.

        Returns a :class:`RawAnswer`; the socket is read until the server
        closes it (the request says ``Connection: close``) or fails.
        """
        host, port, name, ca = self.proxy_target(cluster)
        with open(self.token_file) as f:
            token = f.read().strip()
        ctx = ssl.create_default_context(cadata=ca.decode("ascii"))
        answer = RawAnswer()
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            # A close without TLS close_notify (an aborted answer) is an error.
            tls = ctx.wrap_socket(sock, server_hostname=name, suppress_ragged_eofs=False)
            tls.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                         "Connection: close\r\n\r\n" % (path, name, token)).encode())
            chunks = []
            while True:
                try:
                    data = tls.recv(1 << 20)
                except (OSError, ssl.SSLError) as e:
                    answer.error = e
                    break
                if not data:
                    break
                chunks.append(data)
                if on_head is not None and answer.started is None:
                    answer.started = time.monotonic()
                    on_head()
            answer.parse(b"".join(chunks))
        finally:
            sock.close()
            answer.ended = time.monotonic()
        return answer


class RawAnswer:
    status = None
    headers = None
    body = b""
    error = None
    started = None
    ended = None

    def parse(self, raw):
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            self.body = raw
            return
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            self.headers[key.strip().lower()] = value.strip()
        self.body = body

    @property
    def complete(self):
        """True when the body is as long as its Content-Length said."""
        length = (self.headers or {}).get("content-length")
        return length is not None and int(length) == len(self.body)


# -- the base of the chain tests ---------------------------------------------------


def wait_all(procs, timeout, since=None):
    """Wait for every process; ``{name: (returncode, seconds, stderr)}``, None if it hung.

    Seconds count from ``since`` (a ``time.monotonic()``), by default from now.
    """
    started = time.monotonic() if since is None else since
    ended = {}
    while len(ended) < len(procs) and time.monotonic() - started < timeout:
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.monotonic() - started
        time.sleep(0.02)
    results = {}
    for name, proc in procs.items():
        if name in ended:
            results[name] = (proc.returncode, ended[name], proc.stderr.read().decode())
        else:
            results[name] = None
    return results


def kill_all(procs):
    """Kill the still-running processes a test started and close their pipes."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdout, proc.stderr, proc.stdin):
            if pipe is not None:
                pipe.close()


class ChainTestCase(unittest.TestCase):
    timeout = 150
    chain_options = {}

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="arc-faults-")
        self.chain = FaultChain(self.base, **self.chain_options)
        self.addCleanup(self.chain.stop)
        self.chain.start()
        self.procs = []
        self.addCleanup(self._kill_procs)

    def _kill_procs(self):
        kill_all(self.procs)

    def kubectl_process(self, *args, **kw):
        proc = self.chain.kubectl_process(*args, **kw)
        self.procs.append(proc)
        return proc

    def baseline(self, *names):
        """Descriptor counts once the chain is idle (kubectl's connections closed)."""
        chain = self.chain
        wait_for(lambda: chain.relay_health()["streams_open"] == 0, 10, "an idle relay")
        time.sleep(0.3)
        return {name: chain.fds(name) for name in names}

    def assertBackToBaseline(self, baseline):
        chain = self.chain
        wait_for(lambda: chain.relay_health()["streams_open"] == 0, 10,
                 "the relay's streams to end")
        wait_for(lambda: chain.client_status()["streams"] == 0, 10,
                 "the client's streams to end")
        for name, count in baseline.items():
            settle(lambda: chain.fds(name), count, FD_TOLERANCE, 15,
                   "descriptors of the %s" % name)

    def works_again(self, timeout=20):
        chain = self.chain
        wait_for(lambda: chain.kubectl("get", "pods", check=False).returncode == 0, timeout,
                 "kubectl to work again")

    def start_long_requests(self):
        """``get -w``, ``logs -f`` and ``exec -i cat``, each seen working."""
        watch = self.kubectl_process("get", "pods", "-w")
        logs = self.kubectl_process("logs", "-f", "ticker")
        cat = self.kubectl_process("exec", "-i", "ticker", "--", "cat", stdin=True)
        cat.stdin.write(b"hello through arc\n")
        cat.stdin.flush()
        read_until(watch, lambda text: "ticker" in text, 30)
        read_until(logs, lambda text: text.count("\n") >= 2, 30)
        read_until(cat, lambda text: "hello through arc" in text, 30)
        return {"watch": watch, "logs": logs, "exec": cat}

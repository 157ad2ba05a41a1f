"""Helpers for the hostile-load tests: the real chain with tight timeouts and
limits, raw sockets that misbehave, and process memory readings.

Every socket goes to 127.0.0.1; every loop is bounded in count and time.
"""

import dataclasses
import os
import resource
import socket
import ssl
import time

from arc import demo
from arc.client.localca import SERVER_NAME_SUFFIX
from tests.chain import Chain


def raise_fd_limit(wanted):
    """Raise RLIMIT_NOFILE towards ``wanted`` (within the hard limit); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss(pid):
    """Resident set size of ``pid`` in bytes."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


class HostileChain(Chain):
    """The chain, with ``relay_change``/``client_change`` applied to the configs."""

    def __init__(self, base, *, relay_change=None, client_change=None, **kw):
        super().__init__(base, **kw)
        self.relay_change = relay_change
        self.client_change = client_change

    def start_relay(self):
        if self.relay_change is not None:
            path = self.variant(self.files.relay_config, "relay-hostile.yaml", self.relay_change)
            self.files = dataclasses.replace(self.files, relay_config=path)
        super().start_relay()

    def start_client(self, config=None, name="client", env=None):
        if config is None and self.client_change is not None and name == "client":
            config = self.variant(self.files.client_config, "client-hostile.yaml",
                                  self.client_change)
        return super().start_client(config, name, env)

    @property
    def ca_file(self):
        return os.path.join(self.files.state_dir, "relay-ca.crt")

    def token(self, path):
        with open(path) as f:
            return f.read().strip()

    # -- raw connections ---------------------------------------------------------

    def relay_tls(self, timeout=10):
        """A TLS connection to the relay (verified against its CA)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.set_alpn_protocols(["http/1.1"])
        sock = socket.create_connection(("127.0.0.1", self.files.relay_port), timeout=timeout)
        return context.wrap_socket(sock, server_hostname="localhost")

    def client_tls(self, timeout=10):
        """A TLS connection to the client proxy as kubectl makes it (cluster by SNI)."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
        sock = socket.create_connection(("127.0.0.1", self.files.client_port), timeout=timeout)
        return context.wrap_socket(sock, server_hostname=demo.CLUSTER + "." + SERVER_NAME_SUFFIX)

    def upgrade(self, sock, path, token, cluster=None, upgrade="arc-tunnel/1"):
        lines = ["GET %s HTTP/1.1" % path, "Host: localhost", "Connection: Upgrade",
                 "Upgrade: %s" % upgrade, "Authorization: Bearer %s" % token]
        if cluster:
            lines.append("Arc-Cluster: %s" % cluster)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return read_head(sock)

    def agent_refusal(self):
        """Try one more agent tunnel; returns (status line, body)."""
        with self.relay_tls() as sock:
            head, rest = self.upgrade(sock, "/arc/v1/agent",
                                      self.token(self.files.agent_token_file), demo.CLUSTER)
            return head.split(b"\r\n", 1)[0], rest + read_all(sock, 2)


def read_head(sock, limit=65536):
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def read_all(sock, timeout):
    """What ``sock`` sends until it closes (or ``timeout`` passes)."""
    return read_until_closed(sock, timeout)[0]


def read_until_closed(sock, timeout):
    """``(data, closed)``: what ``sock`` sent, and whether the peer closed it in time."""
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return data, False
        except (OSError, ssl.SSLError):
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def closed_by_peer(sock):
    """True when the peer has closed (or reset) ``sock``; never blocks long."""
    sock.settimeout(0.2)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except socket.timeout:
        return False
    except ssl.SSLWantReadError:
        return False
    except (OSError, ssl.SSLError):
        return True

"""Hostile load against the real processes: slow and silent connections,
garbage on every port, and 10,000 idle watches through one agent tunnel.

Every listener must keep serving legitimate users while it is flooded, close
the offending connections (by the head timeout, or at once for garbage, with
a reason in its log), never die, and keep its memory bounded.
"""

import json
import os
import random
import selectors
import socket
import ssl
import struct
import time

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from arc import pki
from arc.relay.relay import CLIENT_PATH
from arc.tls import client_options, server_options
from arc.tunnel import frames as F
from arc.tunnel.carrier import RawDialerFactory
from arc.tunnel.session import Limits, Session
from arc.tunnel.stream import Stream
from tests.chain import API_TOKEN
from tests.hostile import HostileChain, raise_fd_limit, read_head, read_until_closed, rss

HEAD_TIMEOUT = 3.0
FLOOD = 300
GARBAGE = 1000
RSS_BOUND = 20 * 1024 * 1024


def _short_timeouts(data):
    data["head_timeout"] = HEAD_TIMEOUT


def _start_chain(test, **kw):
    base = os.path.abspath(test.mktemp())
    os.makedirs(base)
    chain = HostileChain(base, relay_change=_short_timeouts, client_change=_short_timeouts,
                         tunnel={"ping_interval": 1.0, "dead_after": 5.0}, **kw)
    test.addCleanup(chain.stop)
    chain.start()
    return chain


def client_hello_prefix(server_name="localhost"):
    """The first bytes of a real TLS ClientHello (the handshake never completes)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    return hello[:len(hello) // 2]


def wait_all_closed(socks, timeout):
    """Sockets the peer has not closed after ``timeout`` (an empty list: all closed)."""
    selector = selectors.DefaultSelector()
    open_ = set()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        open_.add(sock)
    deadline = time.monotonic() + timeout
    try:
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(min(0.5, max(0.01, deadline - time.monotonic()))):
                sock = key.fileobj
                try:
                    while True:
                        data = sock.recv(65536)
                        if not data:
                            raise EOFError
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except (EOFError, OSError, ssl.SSLError):
                    selector.unregister(sock)
                    open_.discard(sock)
    finally:
        selector.close()
    return list(open_)


def close_all(socks):
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


class SlowlorisTests(unittest.TestCase):
    timeout = 120

    def test_flood_of_slow_and_silent_connections(self):
        raise_fd_limit(4 * FLOOD + 1024)
        chain = _start_chain(self)
        flood = []
        self.addCleanup(close_all, flood)
        relay_port, client_port = chain.files.relay_port, chain.files.client_port
        hello = client_hello_prefix()
        slow = []
        per = FLOOD // 6
        for port in (relay_port, client_port):
            # Nothing at all.
            for _ in range(per):
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            # Half a ClientHello: a TLS handshake that never completes.
            for _ in range(per):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(hello)
                flood.append(sock)
        # A request head, one byte at a time, over TLS.
        for _ in range(per):
            sock = chain.relay_tls()
            slow.append((sock, b"GET /arc/v1/client HTTP/1.1\r\nHost: localhost\r\n"
                               b"X-Slow: " + b"a" * 200))
        for _ in range(per):
            sock = chain.client_tls()
            slow.append((sock, b"GET /api/v1/namespaces/default/pods HTTP/1.1\r\n"
                               b"Host: localhost\r\nX-Slow: " + b"a" * 200))
        flood.extend(sock for sock, _ in slow)
        started = time.monotonic()
        self.assertGreaterEqual(len(flood), FLOOD)

        # While the flood is on, kubectl gets its answer within a bound.
        kubectl = chain.kubectl_background("get", "--raw", "/version")
        self.addCleanup(lambda: kubectl.poll() is None and kubectl.kill())
        answered = None
        for step in range(int((HEAD_TIMEOUT + 2) / 0.25)):
            for sock, text in slow:
                if step < len(text):
                    try:
                        sock.send(text[step:step + 1])
                    except OSError:
                        pass
            if answered is None and kubectl.poll() is not None:
                answered = time.monotonic() - started
            time.sleep(0.25)
        out, err = kubectl.communicate(timeout=30)
        if answered is None:
            answered = time.monotonic() - started
        self.assertEqual(kubectl.returncode, 0, err)
        self.assertIn(b"gitVersion", out)
        self.assertLess(answered, 10.0)

        # Every flood connection is closed by the head timeout.
        left = wait_all_closed(flood, HEAD_TIMEOUT + 5)
        self.assertEqual(left, [], "%d of %d flood connections still open"
                         % (len(left), len(flood)))
        for name in ("relay", "agent", "client"):
            self.assertTrue(chain.parts[name].running(), name)
        # One log line for the whole flood, per listener.
        relay_log = chain.parts["relay"].output()
        client_log = chain.parts["client"].output()
        self.assertEqual(relay_log.count("request head not complete"), 1, relay_log[-3000:])
        self.assertEqual(client_log.count("no complete TLS handshake"), 1, client_log[-3000:])
        # And the chain still answers afterwards.
        chain.kubectl("get", "--raw", "/version")
        print("\nslowloris: %d connections, kubectl answered in %.2f s, all closed"
              % (len(flood), answered))


def _frame(ftype, flags, sid, length, payload=b"", version=F.VERSION):
    return struct.pack("!BBHII", version, ftype, flags, sid, length) + payload


def fuzzed_frames(rng):
    """Tunnel input that breaks the framing rules, in several ways."""
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(12, 600)))
    if kind == 1:
        return _frame(F.DATA, F.SYN, 1, 5, b"hello", version=rng.choice([0, 2, 9, 255]))
    if kind == 2:
        return _frame(rng.randrange(4, 256), 0, 0, 0)
    if kind == 3:
        return _frame(F.DATA, 0, 1, F.DEFAULT_MAX_FRAME + rng.randrange(1, 1 << 30)) + b"x" * 64
    if kind == 4:
        return _frame(F.WINDOW_UPDATE, 0, 0, 100)
    if kind == 5:
        return _frame(F.DATA, F.SYN, 2, 0)          # the relay's own parity
    if kind == 6:
        return _frame(F.PING, 0x80, 0, 1)           # unknown flag
    opened = _frame(F.DATA, F.SYN, 1, 2, b"{}")
    return opened + _frame(F.DATA, F.SYN, 1, 2, b"{}")  # reopening a live stream


def bad_websocket_frames(rng):
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(2, 300)))
    if kind == 1:
        return b"\x8b\x80" + os.urandom(4)          # reserved opcode 0xB
    if kind == 2:
        return b"\xf2\x80" + os.urandom(4) + b"x"   # reserved bits set
    return b"\x82\xff" + struct.pack("!Q", 1 << 62) + os.urandom(4)  # absurd length


def websocket_head(token):
    return ("GET /arc/v1/client HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: arc-tunnel.v1\r\n"
            "Authorization: Bearer %s\r\n\r\n" % token).encode()


class GarbageTests(unittest.TestCase):
    timeout = 180

    def relay_garbage(self, chain, rng, count):
        """``count`` garbage connections to the relay, in batches; returns their kinds."""
        token = chain.token(chain.files.user_token_file)
        kinds = {"tls": 0, "http": 0, "frames": 0, "websocket": 0}
        done = 0
        while done < count:
            batch = []
            try:
                for i in range(min(100, count - done)):
                    kind = ("tls", "http", "frames", "frames", "websocket")[(done + i) % 5]
                    kinds[kind] += 1
                    if kind == "tls":
                        sock = socket.create_connection(("127.0.0.1", chain.files.relay_port),
                                                        timeout=10)
                        sock.sendall(os.urandom(rng.randrange(1, 2000)))
                    elif kind == "http":
                        sock = chain.relay_tls()
                        sock.sendall(os.urandom(rng.randrange(1, 2000)) + b"\r\n\r\n")
                    elif kind == "frames":
                        sock = chain.relay_tls()
                        head, rest = chain.upgrade(sock, "/arc/v1/client", token)
                        self.assertIn(b" 101 ", head.split(b"\r\n")[0])
                        sock.sendall(fuzzed_frames(rng))
                    else:
                        sock = chain.relay_tls()
                        sock.sendall(websocket_head(token))
                        head, rest = read_head(sock)
                        self.assertIn(b" 101 ", head.split(b"\r\n")[0])
                        sock.sendall(bad_websocket_frames(rng))
                    batch.append(sock)
                left = wait_all_closed(batch, 15)
                self.assertEqual(left, [], "%d garbage connections left open" % len(left))
            finally:
                close_all(batch)
            done += len(batch)
        return kinds

    def test_garbage_on_every_port(self):
        raise_fd_limit(2048)
        chain = _start_chain(self)
        relay = chain.parts["relay"]
        rng = random.Random(20261125)
        # Warm up (first allocations, caches), then measure.
        self.relay_garbage(chain, rng, 200)
        before = rss(relay.pid)
        started = time.monotonic()
        kinds = self.relay_garbage(chain, rng, GARBAGE)
        elapsed = time.monotonic() - started
        after = rss(relay.pid)
        self.assertTrue(relay.running())
        self.assertLess(after - before, RSS_BOUND,
                        "relay RSS grew by %.1f MiB over %d garbage connections"
                        % ((after - before) / 2 ** 20, GARBAGE))
        # Random bytes as a kubectl request, through the chain to the guard,
        # and TLS garbage to the client proxy.
        socks = []
        answers = []
        try:
            for i in range(100):
                with chain.client_tls() as sock:
                    sock.sendall(os.urandom(rng.randrange(1, 1000)).replace(b"\r\n\r\n", b"")
                                 + b"\r\n\r\n")
                    answer, closed = read_until_closed(sock, 10)
                self.assertTrue(closed, answer)
                answers.append(answer)
            for i in range(50):
                sock = socket.create_connection(("127.0.0.1", chain.files.client_port),
                                                timeout=10)
                sock.sendall(os.urandom(rng.randrange(1, 2000)))
                socks.append(sock)
            self.assertEqual(wait_all_closed(socks, 15), [])
        finally:
            close_all(socks)
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 4")]
        self.assertGreaterEqual(len(refused), 90, answers[:3])
        for name in ("relay", "agent", "client"):
            self.assertTrue(chain.parts[name].running(), name)
        chain.kubectl("get", "--raw", "/version")
        # Each offending tunnel was closed with its reason in the relay's log.
        log = relay.output()
        for reason in ("unsupported tunnel protocol version", "unknown frame type",
                       "exceeds the limit"):
            self.assertIn(reason, log)
        print("\ngarbage: %d connections to the relay (%s) in %.1f s; relay RSS %.1f -> %.1f "
              "MiB (%+.1f MiB); 150 to the client proxy, %d answered 4xx by the guard"
              % (GARBAGE, ", ".join("%s %d" % kv for kv in sorted(kinds.items())), elapsed,
                 before / 2 ** 20, after / 2 ** 20, (after - before) / 2 ** 20, len(refused)))


# -- 10,000 idle watches ----------------------------------------------------------

WATCHES = int(os.environ.get("ARC_TEST_WATCHES", "10000"))
WATCH_PATH = "/api/v1/namespaces/default/pods?watch=true"
CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")


class WatchBackend(Protocol):
    """Holds every watch it is sent; ``emit()`` then sends each one event."""

    def __init__(self, held):
        self.held = held
        self.buf = b""
        self.watching = False

    def dataReceived(self, data):
        if self.watching:
            return
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        head = self.buf.decode("latin-1")
        if (WATCH_PATH not in head.split("\r\n", 1)[0]
                or "authorization: bearer %s" % API_TOKEN.lower() not in head.lower()):
            self.transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            return
        self.watching = True
        self.buf = b""
        self.transport.write(CHUNKED_HEAD)
        self.held.append(self)

    def emit(self, n):
        event = json.dumps({"type": "ADDED", "object": {"kind": "Pod", "apiVersion": "v1",
                                                         "metadata": {"name": "pod-%d" % n}}})
        body = event.encode() + b"\n"
        self.transport.write(b"%x\r\n%s\r\n" % (len(body), body))


class WatchReader(Protocol):
    def __init__(self):
        self.buf = b""
        self.head = False
        self.event = False
        self.lost = None

    def dataReceived(self, data):
        if len(self.buf) < 4096:
            self.buf += data
        if not self.head and self.buf.startswith(b"HTTP/1.1 200 "):
            self.head = True
        if not self.event and b'"type": "ADDED"' in self.buf:
            self.event = True

    def connectionLost(self, reason):
        self.lost = reason


class WatchChain(HostileChain):
    """Relay and agent processes; the agent's API server is a WatchBackend."""

    backend_kubeconfig = None

    def start_api(self):
        os.makedirs(self.api_dir, exist_ok=True)
        with open(os.path.join(self.api_dir, "kubeconfig"), "w") as f:
            f.write(self.backend_kubeconfig)


class WatchScaleTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def wait(self, predicate, what, timeout):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail("timed out after %.0f s waiting for %s" % (timeout, what))
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_ten_thousand_idle_watches(self):
        limit = raise_fd_limit(2 * WATCHES + 2048)
        watches = min(WATCHES, limit - 1024)
        if watches < WATCHES:
            self.assertGreaterEqual(watches, 2000, "the descriptor limit allows only %d" % limit)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        ca, ca_key = pki.new_ca("watch test CA")
        cert, key = pki.issue(ca, ca_key, "backend", ips=["127.0.0.1"])
        held = []
        backend = reactor.listenTCP(
            0, TLSMemoryBIOFactory(server_options(cert, key), False,
                                   Factory.forProtocol(lambda: WatchBackend(held))),
            backlog=1024, interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in held])
        import base64
        WatchChain.backend_kubeconfig = json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "backend",
            "clusters": [{"name": "backend", "cluster": {
                "server": "https://127.0.0.1:%d" % backend.getHost().port,
                "certificate-authority-data": base64.b64encode(ca).decode()}}],
            "users": [{"name": "u", "user": {"token": API_TOKEN}}],
            "contexts": [{"name": "backend", "context": {"cluster": "backend", "user": "u"}}]})

        def limits(data):
            data["limits"] = {"max_streams_per_user": 2 * watches}

        chain = WatchChain(base, relay_change=limits, with_client=False,
                           tunnel={"max_streams": 2 * watches,
                                   "max_pending_opens": 1000})
        self.addCleanup(chain.stop)
        chain.start()
        relay, agent = chain.parts["relay"], chain.parts["agent"]

        # One client tunnel from this process, as arc-client would open it.
        with open(chain.ca_file, "rb") as f:
            relay_ca = f.read()
        session_limits = Limits(max_streams=2 * watches, max_pending_opens=500)
        factory = RawDialerFactory(
            "localhost", CLIENT_PATH,
            {"Authorization": "Bearer " + chain.token(chain.files.user_token_file)},
            lambda: Session(dialer=True, clock=reactor, limits=session_limits,
                            name="watch-test"), reactor)
        endpoint = wrapClientTLS(client_options("localhost", ca_pem=relay_ca),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                    chain.files.relay_port))
        protocol = yield endpoint.connect(factory)
        session = yield protocol.upgraded
        # Dropped at the end: a graceful TLS close would wait for the relay's
        # answer while the cleanups below block the reactor to stop processes.
        self.addCleanup(protocol.transport.abortConnection)
        # The agent's tunnel is up once a first watch gets its answer head.
        request = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
                   "Accept: application/json\r\n\r\n" % (WATCH_PATH, API_TOKEN)).encode()
        metadata = json.dumps({"cluster": "demo"}).encode()
        readers = []

        def open_watch():
            stream = Stream(session, metadata)
            stream.opened(session.open(stream, metadata), 60)
            reader = WatchReader()
            stream.attach(reader)
            stream.write(request)
            readers.append(reader)
            return reader

        for _ in range(100):
            first = open_watch()
            yield self.wait(lambda: first.head or first.lost, "a first watch", 10)
            if first.head:
                break
            readers.remove(first)
            yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertTrue(first.head, "no watch got through: %r" % (first.buf,))
        yield task.deferLater(reactor, 0.5, lambda: None)
        before = {"relay": rss(relay.pid), "agent": rss(agent.pid)}

        started = time.monotonic()
        while len(readers) < watches:
            if len(session.pending_opens) >= session_limits.max_pending_opens:
                yield task.deferLater(reactor, 0.005, lambda: None)
                continue
            open_watch()
        yield self.wait(lambda: len(held) >= watches or any(r.lost for r in readers),
                        "the backend to hold every watch", 150)
        yield self.wait(lambda: all(r.head for r in readers) or any(r.lost for r in readers),
                        "every watch's answer head", 30)
        opened_in = time.monotonic() - started
        lost = [r for r in readers if r.lost is not None]
        self.assertEqual(lost, [], "%d watches ended: %s" % (len(lost), lost[:1] and
                                                             lost[0].lost.getErrorMessage()))
        self.assertEqual(len(held), watches)
        # Idle for a while: nothing closes them.
        yield task.deferLater(reactor, 2.0, lambda: None)
        after = {"relay": rss(relay.pid), "agent": rss(agent.pid)}
        self.assertEqual([r for r in readers if r.lost is not None], [])

        # One event to each watch, and each one gets it.
        for n, watch in enumerate(held):
            watch.emit(n)
        yield self.wait(lambda: all(r.event for r in readers) or any(r.lost for r in readers),
                        "every watch's event", 60)
        self.assertEqual([r for r in readers if not r.event], [])
        self.assertTrue(relay.running() and agent.running())
        per = {name: (after[name] - before[name]) / float(watches) for name in before}
        print("\n%d idle watches through one agent tunnel, opened in %.1f s; memory per stream:"
              " relay %.1f KiB (RSS %.0f -> %.0f MiB), agent %.1f KiB (RSS %.0f -> %.0f MiB, "
              "incl. its TLS connection to the API server)"
              % (watches, opened_in, per["relay"] / 1024, before["relay"] / 2 ** 20,
                 after["relay"] / 2 ** 20, per["agent"] / 1024, before["agent"] / 2 ** 20,
                 after["agent"] / 2 ** 20))


class StandaloneGuardSlowlorisTests(unittest.TestCase):
    """The standalone guard's listener: silent and slow connections are closed
    by its idle_timeout (the wait for a complete request head) while kubectl
    keeps getting answers."""

    timeout = 120

    def test_flood_of_slow_and_silent_connections(self):
        import yaml
        from arc.testing.procs import Part, port_in_use, twist, wait_for
        from tests.test_guard_standalone import StandaloneGuard
        raise_fd_limit(1024)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        guard = StandaloneGuard(base)
        self.addCleanup(guard.stop)
        guard.start()
        # Restart the guard with a short idle_timeout.
        guard.parts["guard"].stop()
        with open(guard.config) as f:
            config = yaml.safe_load(f)
        config["guard"]["idle_timeout"] = HEAD_TIMEOUT
        with open(guard.config, "w") as f:
            yaml.safe_dump(config, f)
        part = guard.parts["guard"] = Part("guard", twist("arc-guard", guard.config),
                                           os.path.join(base, "guard-2.log")).start()
        wait_for(lambda: port_in_use(guard.port), 30, "the guard to listen again", alive=part)
        flood = []
        self.addCleanup(close_all, flood)
        hello = client_hello_prefix("127.0.0.1")
        for _ in range(50):
            flood.append(socket.create_connection(("127.0.0.1", guard.port), timeout=5))
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", guard.port), timeout=5)
            sock.sendall(hello)
            flood.append(sock)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        slow = []
        for _ in range(50):
            sock = context.wrap_socket(socket.create_connection(("127.0.0.1", guard.port),
                                                                timeout=5))
            slow.append(sock)
        flood.extend(slow)
        text = b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
        started = time.monotonic()
        answer = guard.kubectl("get", "--raw", "/version", timeout=30)
        answered = time.monotonic() - started
        self.assertIn("gitVersion", answer.stdout)
        self.assertLess(answered, 10.0)
        for step in range(int((HEAD_TIMEOUT + 2) / 0.25)):
            for sock in slow:
                try:
                    sock.send(text[step:step + 1])
                except OSError:
                    pass
            time.sleep(0.25)
        left = wait_all_closed(flood, HEAD_TIMEOUT + 5)
        self.assertEqual(left, [], "%d of %d flood connections still open"
                         % (len(left), len(flood)))
        self.assertTrue(part.running())
        guard.kubectl("get", "--raw", "/version")

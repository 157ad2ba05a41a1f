"""Half-close and random cancellations, in one process over loopback TLS.

client proxy ⇄ relay ⇄ agent (with its guard, in passthrough mode) ⇄ a
test backend (:mod:`tests.faultbackend`), as in production but in one
reactor, so every stream table and descriptor can be inspected.

- A stream whose opener half-closes right after its request (FIN) still
  gets the whole answer through the guard.
- 5,000 connections to the client proxy, cancelled at random points (before
  or during the TLS handshake, before or during the request, during the
  answer), with bounded concurrency: afterwards every stream table is
  empty and the process holds no more descriptors than before.  The
  random plan's seed is printed; ``ARC_FAULT_SEED=N`` replays it.
"""

import os
import random
import time

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from zope.interface import implementer

from arc.guard.audit import AuditLog
from arc.guard.guard import Guard, GuardConfig
from arc.identity.authenticator import Authenticator
from arc.tunnel.session import Limits
from arc.tunnel.stream import Stream
from tests.faultbackend import BackendFactory, pattern
from tests.test_session import Recorder
from tests import inprocess

CANCELLATIONS = 5000
CONCURRENCY = 64
FD_TOLERANCE = 4


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class InProcessChain(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        self.backend = BackendFactory(reactor, "in-process")

        def make_guard(upstream):
            return Guard(GuardConfig(enabled=True, authenticator=Authenticator(None, (), True),
                                     allow_impersonation=False, audit=AuditLog("none"),
                                     token_refresh=60.0), "demo", upstream)

        chain = yield inprocess.InProcessChain(
            self, self.backend, limits=Limits(ping_interval=5, dead_after=15),
            make_guard=make_guard, dialer_options={"drain_timeout": 1}).start()
        self.relay, self.agent, self.proxy = chain.relay, chain.agent, chain.proxy
        self.proxy_port = self.proxy.port
        self.proxy_tls = chain.proxy_tls

    def wait(self, predicate, what, timeout=20.0):
        return inprocess.wait(self, predicate, what, timeout)

    # -- stream tables -----------------------------------------------------------------

    def tables(self):
        """Open streams everywhere: relay pairs and tunnels, agent, client, backend.

        Backend connections the guard keeps idle for the next client (at most
        its pool's size) are not counted as open.
        """
        relay_sessions = self.relay.sessions()
        return {
            "relay pairs": self.relay.streams_open,
            "relay tunnels": sum(len(s.streams) for s in relay_sessions),
            "agent": sum(len(s.streams) for s in self.agent.sessions),
            "client": sum(len(s.streams) for s in self.proxy.sessions),
            "backend connections": self.backend.connections - len(self.idle),
        }

    @property
    def idle(self):
        return self.agent.guard.upstream.idle

    def empty(self):
        return not any(self.tables().values())

    def request(self, path):
        return ("GET %s HTTP/1.1\r\nHost: demo\r\nAuthorization: Bearer caller-token\r\n"
                "Connection: close\r\n\r\n" % (path,)).encode()


@implementer(IHandshakeListener)
class Cancelling(Protocol):
    """One connection to the client proxy that follows a random plan."""

    def __init__(self, plan, done):
        self.plan = plan
        self.done = done
        self.received = 0
        self.handshake = False
        self.timers = []

    def later(self, delay, f, *args):
        self.timers.append(reactor.callLater(delay, f, *args))

    def connectionMade(self):
        kind, data, delay = self.plan
        if kind == "tcp-abort":
            self.transport.abortConnection()
        elif kind == "handshake-abort":
            self.later(delay, self.transport.abortConnection)
        else:
            if data:
                self.transport.write(data)
            if kind == "close":
                self.later(delay, self.transport.loseConnection)
            elif kind != "complete":
                self.later(delay, self.transport.abortConnection)

    def handshakeCompleted(self):
        self.handshake = True

    def dataReceived(self, data):
        self.received += len(data)

    def connectionLost(self, reason):
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        if not self.done.called:
            self.done.callback((self.plan[0], self.handshake, self.received, reason))


class HalfCloseTests(InProcessChain):
    @defer.inlineCallbacks
    def fetch_with_fin(self, path, fin_after_head=False):
        """Open a stream on the client's tunnel, send ``path``, half-close (FIN)."""
        session = self.proxy.session()
        stream = Stream(session, b'{"cluster": "demo"}')
        stream.opened(session.open(stream, b'{"cluster": "demo"}'), session.limits.open_timeout)
        proto = Recorder()
        stream.attach(proto)
        request = self.request(path).replace(b"Connection: close\r\n", b"")
        if fin_after_head:
            stream.write(request[:-2])
            yield sleep(0.05)
            stream.write(request[-2:])
        else:
            stream.write(request)
        stream.loseConnection()          # FIN: the request is all there is
        yield self.wait(lambda: proto.lost is not None, "the stream to end")
        defer.returnValue(proto)

    @defer.inlineCallbacks
    def test_fin_after_request_still_gets_the_whole_answer(self):
        for path, body, fin_after_head in (
                ("/slow?seconds=0.5&pieces=8", b"s" * 8 * 1024, False),
                ("/slow?seconds=0.2&pieces=4", b"s" * 4 * 1024, True),
                ("/big?size=3000000", pattern(3000000), False)):
            proto = yield self.fetch_with_fin(path, fin_after_head)
            head, _, got = bytes(proto.data).partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
            self.assertEqual(len(got), len(body), path)
            self.assertTrue(got == body, path)
            self.assertTrue(proto.eof, "no FIN after the answer (%s)" % path)
            self.assertIsInstance(proto.lost.value, ConnectionDone, path)
        yield self.wait(self.empty, "every stream table to empty")


class CancellationTests(InProcessChain):
    PATHS = ["/who", "/slow?seconds=0.3&pieces=3", "/big?size=400000", "/forever"]

    def plan(self, rng):
        kind = rng.choice(["tcp-abort", "handshake-abort", "silent", "partial", "abort",
                           "abort", "close", "complete"])
        path = "/who" if kind == "complete" else rng.choice(self.PATHS)
        request = self.request(path)
        if kind == "silent":
            data = b""
        elif kind == "partial":
            data = request[:rng.randrange(1, len(request) - 1)]
        elif kind == "close":
            data = request[:rng.randrange(0, len(request) + 1)]
        else:
            data = request
        delay = rng.choice([0, 0, rng.uniform(0, 0.002), rng.uniform(0, 0.02),
                            rng.uniform(0, 0.2)])
        return kind, data, delay

    def connect(self, plan):
        done = defer.Deferred()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port, timeout=10)
        if plan[0] != "tcp-abort":
            endpoint = wrapClientTLS(self.proxy_tls, endpoint)
        protocol = Cancelling(plan, done)
        connecting = connectProtocol(endpoint, protocol)
        connecting.addErrback(lambda f: done.called or done.callback((plan[0], False, 0, f)))
        # A connection that outlives its plan by far is stuck: end it and count it.
        def give_up():
            if not done.called:
                done.callback((plan[0] + " STUCK", protocol.handshake, protocol.received, None))
                if protocol.transport is not None:
                    protocol.transport.abortConnection()

        stuck = reactor.callLater(15, give_up)

        def finished(result):
            if stuck.active():
                stuck.cancel()
            return result

        done.addBoth(finished)
        return done

    @defer.inlineCallbacks
    def test_random_cancellations_leave_nothing_behind(self):
        # Warm up: one full answer, then measure the idle process.
        answer = yield self.connect(("complete", self.request("/who"), 0))
        self.assertGreater(answer[2], 0)
        yield self.wait(self.empty, "an idle chain")
        yield sleep(0.2)
        fds = fd_count()
        seed = int(os.environ.get("ARC_FAULT_SEED", random.randrange(1 << 30)))
        rng = random.Random(seed)
        plans = [self.plan(rng) for _ in range(CANCELLATIONS)]
        semaphore = defer.DeferredSemaphore(CONCURRENCY)
        started = time.monotonic()
        peak = {}
        results = []

        def run(plan):
            d = self.connect(plan)

            def record(result):
                results.append(result)
                for name, value in self.tables().items():
                    peak[name] = max(peak.get(name, 0), value)
            return d.addCallback(record)

        yield defer.gatherResults([semaphore.run(run, plan) for plan in plans])
        ran = time.monotonic() - started
        counts = {}
        for kind, handshake, received, _ in results:
            counts[kind] = counts.get(kind, 0) + 1
        stuck = [r for r in results if r[0].endswith("STUCK")]
        completed = [r for r in results if r[0] == "complete"]
        print("\n%d cancellations in %.1f s (seed %d, concurrency %d): %s; peak open: %s"
              % (len(results), ran, seed, CONCURRENCY,
                 ", ".join("%s %d" % kv for kv in sorted(counts.items())), peak))
        self.assertEqual(len(results), CANCELLATIONS)
        self.assertEqual(stuck, [], "connections stuck (seed %d)" % seed)
        # The connections that read their answer got it, among all the noise.
        self.assertTrue(completed)
        self.assertEqual([r for r in completed if r[2] < len(b"HTTP/1.1 200")], [],
                         "a complete request got no answer (seed %d)" % seed)
        tables = {}

        def empty():
            tables.update(self.tables())
            return not any(tables.values())

        try:
            yield self.wait(empty, "every stream table to empty", timeout=20)
        except self.failureException:
            self.fail("streams left after the cancellations (seed %d): %s" % (seed, tables))
        # Idle connections to the backend are bounded by the guard's pool, and
        # go with it.
        self.assertLessEqual(len(self.idle), self.idle.most)
        self.idle.close()
        yield self.wait(lambda: self.backend.connections == 0, "the pooled connections to close")
        now = []

        def settled():
            now.append(fd_count())
            return now[-1] <= fds + FD_TOLERANCE

        try:
            yield self.wait(settled, "descriptors back to the baseline", timeout=20)
        except self.failureException:
            self.fail("descriptors: %d before, %d after (seed %d)" % (fds, now[-1], seed))
        # The chain still answers.
        answer = yield self.connect(("complete", self.request("/who"), 0))
        self.assertGreater(answer[2], 0)

"""Backpressure end to end, in one process over real loopback TLS sockets.

client proxy ⇄ relay ⇄ agent ⇄ backend, as in production but in one
reactor so the buffers of every hop can be measured.  A reader that stops
reading while the backend tries to send 200 MB must stall only its own
stream: a small request on the same tunnels still answers, and neither the
relay nor the agent buffers more than a few stream windows.
"""


from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from arc.tls import pending_write_bytes
from arc.tunnel import frames as F
from tests.inprocess import InProcessChain, wait

BIG = 200 * 1024 * 1024
CHUNK = 256 * 1024


@implementer(IPushProducer)
class Backend(Protocol):
    """``big\\n`` → 200 MB as fast as the socket takes it; ``small\\n`` → 5 bytes."""

    sent = 0
    connections = 0

    def connectionMade(self):
        Backend.connections += 1

    def connectionLost(self, reason):
        Backend.connections -= 1

    def dataReceived(self, data):
        if data.startswith(b"big"):
            self.paused = False
            self.transport.registerProducer(self, True)
            self.resumeProducing()
        elif data.startswith(b"small"):
            self.transport.write(b"pong\n")

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        block = b"x" * CHUNK
        while not self.paused and Backend.sent < BIG:
            self.transport.write(block)
            Backend.sent += CHUNK

    def stopProducing(self):
        self.paused = True


class Reader(Protocol):
    def __init__(self):
        self.received = 0
        self.done = defer.Deferred()
        self.data = b""

    def dataReceived(self, data):
        self.received += len(data)
        if len(self.data) < 64:
            self.data += data[:64]
        if not self.done.called and b"\n" in self.data:
            self.done.callback(self.data)


class FlowControlTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        Backend.sent = 0
        chain = yield InProcessChain(self, Factory.forProtocol(Backend)).start()
        self.relay, self.agent, self.proxy = chain.relay, chain.agent, chain.proxy
        self.endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port,
                                           chain.proxy_tls)

    def wait(self, predicate, what, timeout=20.0):
        return wait(self, predicate, what, timeout)

    def relay_buffered(self):
        sessions = list(self.relay.clients)
        for tunnels in self.relay.agents.values():
            sessions.extend(tunnels)
        return sum(pending_write_bytes(s.transport) for s in sessions)

    def agent_buffered(self):
        total = 0
        for session in self.agent.sessions:
            total += pending_write_bytes(session.transport)
            total += sum(getattr(h, "buffered", 0) for h in session.streams.values())
        return total

    @defer.inlineCallbacks
    def test_stalled_reader_bounds_buffers_and_spares_other_streams(self):
        big = Reader()
        proto = yield connectProtocol(self.endpoint, big)
        proto.transport.write(b"big\n")
        yield self.wait(lambda: big.received > 0, "the first bytes of the big answer")
        # The reader stops reading: from now on only buffers can absorb data.
        proto.transport.pauseProducing()
        samples = []
        stable = 0
        for _ in range(400):
            yield task.deferLater(reactor, 0.05, lambda: None)
            samples.append(Backend.sent)
            stable = stable + 1 if len(samples) > 1 and samples[-1] == samples[-2] else 0
            if stable >= 20:
                break
        self.assertGreaterEqual(stable, 20, "the backend never stopped: %d bytes sent"
                                % Backend.sent)
        self.assertLess(Backend.sent, 40 * 1024 * 1024,
                        "backpressure did not reach the backend")
        relay = self.relay_buffered()
        agent = self.agent_buffered()
        # Each hop holds at most about one stream window (256 KiB) plus a read.
        self.assertLess(relay, 4 * F.INITIAL_WINDOW, "relay buffers %d bytes" % relay)
        self.assertLess(agent, 4 * F.INITIAL_WINDOW, "agent buffers %d bytes" % agent)
        print("\nbuffered while stalled: relay %d B, agent %d B; backend sent %d B"
              % (relay, agent, Backend.sent))

        # A small request on the same tunnels answers while the big one stalls.
        small = Reader()
        other = yield connectProtocol(self.endpoint, small)
        other.transport.write(b"small\n")
        started = reactor.seconds()
        answer = yield small.done
        self.assertEqual(answer, b"pong\n")
        self.assertLess(reactor.seconds() - started, 5.0)
        other.transport.loseConnection()

        # Reading again drains everything: nothing was lost.
        stalled_at = big.received
        proto.transport.resumeProducing()
        yield self.wait(lambda: big.received >= stalled_at + 8 * 1024 * 1024,
                        "the big answer to flow again")
        proto.transport.abortConnection()
        yield self.wait(lambda: not any(s.streams for s in self.agent.sessions)
                        and Backend.connections == 0, "every stream and connection to end")


class BulkOverEachCarrierTests(unittest.TestCase):
    """A download runs at full speed on either carrier: credit keeps flowing."""

    timeout = 120
    transport = "tunnel"

    @defer.inlineCallbacks
    def setUp(self):
        Backend.sent = 0
        chain = yield InProcessChain(self, Factory.forProtocol(Backend),
                                     transport=self.transport).start()
        self.agent, self.proxy = chain.agent, chain.proxy
        self.endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port,
                                           chain.proxy_tls)

    @defer.inlineCallbacks
    def test_download(self):
        reader = Reader()
        proto = yield connectProtocol(self.endpoint, reader)
        proto.transport.write(b"big\n")
        size = 64 * 1024 * 1024
        started = reactor.seconds()
        yield wait(self, lambda: reader.received >= size, "64 MB through the %s carrier"
                   % self.transport, timeout=60)
        elapsed = reactor.seconds() - started
        print("\n%s carrier: 64 MB in %.2f s" % (self.transport, elapsed))
        proto.transport.abortConnection()
        yield wait(self, lambda: not any(s.streams for s in self.agent.sessions)
                   and Backend.connections == 0, "every stream and connection to end")


class BulkOverWebSocketTests(BulkOverEachCarrierTests):
    transport = "websocket"


class GuardedReader(Protocol):
    """Counts the bytes of one HTTP answer."""

    def __init__(self):
        self.received = 0
        self.head = b""
        self.lost = False

    def connectionLost(self, reason):
        self.lost = True

    def connectionMade(self):
        self.transport.write(b"GET /big?size=%d HTTP/1.1\r\nHost: demo\r\n"
                             b"Authorization: Bearer caller-token\r\n\r\n" % (64 << 20))

    def dataReceived(self, data):
        self.received += len(data)
        if len(self.head) < 200:
            self.head += data[:200]


class GuardedBulkOverEachCarrierTests(unittest.TestCase):
    """The same through the agent's guard (passthrough), as arc is deployed."""

    timeout = 120
    transport = "tunnel"

    @defer.inlineCallbacks
    def setUp(self):
        from arc.guard.audit import AuditLog
        from arc.guard.guard import Guard, GuardConfig
        from arc.identity.authenticator import Authenticator
        from tests.faultbackend import BackendFactory

        def make_guard(upstream):
            return Guard(GuardConfig(enabled=True, authenticator=Authenticator(None, (), True),
                                     allow_impersonation=False, audit=AuditLog("none"),
                                     token_refresh=60.0), "demo", upstream)

        chain = yield InProcessChain(self, BackendFactory(reactor, "in-process"),
                                     make_guard=make_guard, transport=self.transport).start()
        self.agent, self.proxy = chain.agent, chain.proxy
        self.endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port,
                                           chain.proxy_tls)

    @defer.inlineCallbacks
    def test_download(self):
        reader = GuardedReader()
        proto = yield connectProtocol(self.endpoint, reader)
        started = reactor.seconds()
        yield wait(self, lambda: reader.received >= 64 << 20, "64 MB through the guard and "
                   "the %s carrier (got %d B)" % (self.transport, reader.received), timeout=60)
        self.assertTrue(reader.head.startswith(b"HTTP/1.1 200 "), reader.head)
        print("\n%s carrier, guard: 64 MB in %.2f s"
              % (self.transport, reactor.seconds() - started))
        if not reader.lost:
            proto.transport.abortConnection()
        yield wait(self, lambda: not any(s.streams for s in self.agent.sessions),
                   "every stream to end")


class GuardedBulkOverWebSocketTests(GuardedBulkOverEachCarrierTests):
    transport = "websocket"


"""Backpressure end to end, in one process over real loopback TLS sockets.

client proxy ⇄ relay ⇄ agent ⇄ backend, as in production but in one
reactor so the buffers of every hop can be measured.  A reader that stops
reading while the backend tries to send 200 MB must stall only its own
stream: a small request on the same tunnels still answers, and neither the
relay nor the agent buffers more than a few stream windows.
"""

import os

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from arc import pki
from arc.agent.agent import Agent
from arc.guard.upstream import APIServer
from arc.client.config import ClientConfig, ClusterEntry
from arc.client.tap import ProxyService
from arc.kube.kubeconfig import Upstream as Target
from arc.relay.registry import Binding, Identity, Registry, token_digest
from arc.relay.relay import AGENT_PATH, Relay
from arc.tls import client_options, pending_write_bytes, server_options
from arc.tunnel import frames as F
from arc.tunnel.carrier import TunnelServerFactory
from arc.tunnel.dial import TunnelDialer
from arc.tunnel.session import Limits
from arc.tunnel.settings import RelayLink

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
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        ca, ca_key = pki.new_ca("flow test CA")
        cert, key = pki.issue(ca, ca_key, "localhost", dns_names=["localhost"],
                              ips=["127.0.0.1"])
        tls = server_options(cert, key)
        # Backend (the "API server").
        backend = reactor.listenTCP(0, TLSMemoryBIOFactory(tls, False,
                                                           Factory.forProtocol(Backend)),
                                    interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        # Relay.
        alice = Identity("alice", ("dev",))
        registry = Registry({"demo": token_digest("agent-token")},
                            {token_digest("user-token"): alice},
                            {"demo": Binding(groups=frozenset({"dev"}))})
        self.relay = Relay(reactor, registry, Limits())
        factory = TunnelServerFactory(reactor, self.relay.accept, self.relay.plain)
        relay_port = reactor.listenTCP(0, TLSMemoryBIOFactory(tls, False, factory),
                                       interface="127.0.0.1")
        self.addCleanup(relay_port.stopListening)
        relay_url = "https://localhost:%d" % relay_port.getHost().port
        # Agent.
        target = Target(server="https://127.0.0.1:%d" % backend.getHost().port,
                        host="127.0.0.1", port=backend.getHost().port, ca_pem=ca)
        self.agent = Agent(reactor, "demo", APIServer(reactor, target), Limits())
        dialer = TunnelDialer(reactor, relay_url=relay_url, path=AGENT_PATH,
                              credential=lambda: "agent-token",
                              make_session=self.agent.make_session,
                              tls_options=client_options("localhost", ca_pem=ca),
                              extra_headers={"Arc-Cluster": "demo"})
        dialer.startService()
        self.addCleanup(dialer.stopService)
        # Client proxy.
        cfg = ClientConfig(
            file="flow-test", listen="tcp:0:interface=127.0.0.1",
            state_dir=os.path.join(base, "client"),
            relay=RelayLink(url=relay_url, server_name="localhost", ca_pem=ca,
                            credential=lambda: "user-token", transport="tunnel",
                            websocket_mask=True),
            kubeconfig=os.path.join(base, "kubeconfig"), set_current_context=False,
            clusters=(ClusterEntry("demo", "demo", None, None),), limits=Limits())
        self.proxy = ProxyService(cfg, reactor)
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        yield self.proxy.ready
        yield self.wait(lambda: self.agent.up and self.proxy.session() is not None,
                        "both tunnels up")
        port = self.proxy.port
        self.endpoint = SSL4ClientEndpoint(
            reactor, "127.0.0.1", port,
            client_options("demo.arc.localhost", ca_pem=self.proxy.local_ca.ca_cert_pem))

    @defer.inlineCallbacks
    def wait(self, predicate, what, timeout=20.0):
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("timed out waiting for %s" % (what,))

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

"""The whole chain in one reactor over loopback TLS, for tests that inspect buffers.

client proxy ⇄ relay ⇄ agent ⇄ a backend the test supplies, wired as in
production (real sockets, real TLS), so that every stream table, buffer and
descriptor of every part can be read from the test.
"""

import os
import time

from twisted.internet import defer, reactor, task
from twisted.protocols.tls import TLSMemoryBIOFactory

from arc import pki
from arc.agent.agent import Agent
from arc.client.config import ClientConfig, ClusterEntry
from arc.client.tap import ProxyService
from arc.guard.upstream import APIServer
from arc.kube.kubeconfig import Upstream as Target
from arc.relay.registry import Binding, Identity, Registry, token_digest
from arc.relay.relay import AGENT_PATH, Relay
from arc.tls import client_options, server_options
from arc.tunnel.carrier import TunnelServerFactory
from arc.tunnel.dial import TunnelDialer
from arc.tunnel.session import Limits
from arc.tunnel.settings import RelayLink


class InProcessChain:
    """Attributes once started: ``ca``, ``backend_port``, ``relay``, ``agent``,
    ``proxy`` and ``proxy_tls`` (client options for the proxy's cluster ``demo``).
    """

    def __init__(self, testcase, backend_factory, *, limits=None, make_guard=None,
                 dialer_options=None, transport="tunnel"):
        self.testcase = testcase
        self.backend_factory = backend_factory
        self.limits = limits or Limits()
        self.make_guard = make_guard            # make_guard(upstream) -> Guard or None
        self.dialer_options = dict(dialer_options or {})
        self.transport = transport              # the carrier of both tunnels
        self.dialer_options.setdefault("transport", transport)

    def _listen(self, factory):
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(self.tls, False, factory),
                                 interface="127.0.0.1")
        self.testcase.addCleanup(port.stopListening)
        return port

    @defer.inlineCallbacks
    def start(self):
        test = self.testcase
        base = os.path.abspath(test.mktemp())
        os.makedirs(base)
        self.ca, ca_key = pki.new_ca("in-process test CA")
        cert, key = pki.issue(self.ca, ca_key, "localhost", dns_names=["localhost"],
                              ips=["127.0.0.1"])
        self.tls = server_options(cert, key)
        self.backend_port = self._listen(self.backend_factory)
        registry = Registry({"demo": token_digest("agent-token")},
                            {token_digest("user-token"): Identity("alice", ("dev",))},
                            {"demo": Binding(groups=frozenset({"dev"}))})
        self.relay = Relay(reactor, registry, self.limits)
        relay_port = self._listen(TunnelServerFactory(reactor, self.relay.accept,
                                                      self.relay.plain))
        relay_url = "https://localhost:%d" % relay_port.getHost().port
        backend = self.backend_port.getHost().port
        upstream = APIServer(reactor, Target(server="https://127.0.0.1:%d" % backend,
                                             host="127.0.0.1", port=backend, ca_pem=self.ca))
        guard = self.make_guard(upstream) if self.make_guard else None
        test.addCleanup(upstream.idle.close)
        self.agent = Agent(reactor, "demo", upstream, self.limits, guard)
        dialer = TunnelDialer(reactor, relay_url=relay_url, path=AGENT_PATH,
                              credential=lambda: "agent-token",
                              make_session=self.agent.make_session,
                              tls_options=client_options("localhost", ca_pem=self.ca),
                              extra_headers={"Arc-Cluster": "demo"}, **self.dialer_options)
        dialer.startService()
        test.addCleanup(dialer.stopService)
        cfg = ClientConfig(
            file="in-process-test", listen="tcp:0:interface=127.0.0.1",
            state_dir=os.path.join(base, "client"),
            relay=RelayLink(url=relay_url, server_name="localhost", ca_pem=self.ca,
                            credential=lambda: "user-token", transport=self.transport,
                            websocket_mask=True),
            kubeconfig=os.path.join(base, "kubeconfig"), set_current_context=False,
            clusters=(ClusterEntry("demo", "demo", None, None),), limits=self.limits)
        self.proxy = ProxyService(cfg, reactor)
        self.proxy.startService()
        test.addCleanup(self.proxy.stopService)
        yield self.proxy.ready
        yield wait(test, lambda: self.agent.up and self.proxy.session() is not None,
                   "both tunnels up")
        self.proxy_tls = client_options("demo.arc.localhost",
                                        ca_pem=self.proxy.local_ca.ca_cert_pem)
        return self


@defer.inlineCallbacks
def wait(testcase, predicate, what, timeout=20.0):
    """Poll ``predicate`` every 50 ms; fail ``testcase`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            testcase.fail("timed out after %.0f s waiting for %s" % (timeout, what))
        yield task.deferLater(reactor, 0.05, lambda: None)

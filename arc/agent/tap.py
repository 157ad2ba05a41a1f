"""``twistd arc-agent --config agent.yaml``."""

from twisted.application.service import MultiService

from arc import allocator
from arc import __version__
from arc.agent.agent import Agent
from arc.agent.config import load_agent_config
from arc.guard.guard import Guard, load_target
from arc.guard.upstream import APIServer
from arc.relay.relay import AGENT_PATH
from arc.service import ConfigOptions, parsed_config
from arc.tunnel.dial import TunnelDialer
from arc.tunnel.replicas import replica_dialers


class Options(ConfigOptions):
    synopsis = "--config agent.yaml"
    longdesc = ("Run an arc agent in a cluster: keeps an outbound tunnel to the relay and "
                "serves its streams from kube-apiserver.")

    @staticmethod
    def loader(path):
        cfg = load_agent_config(path)
        target = load_target(cfg.file, cfg.kubeconfig, cfg.context, cfg.guard)
        return cfg, target


class AgentService(MultiService):
    def __init__(self, cfg, target, reactor):
        super().__init__()
        self.config = cfg
        upstream = APIServer(reactor, target, cfg.connect_timeout)
        guard = None
        if cfg.guard.enabled:
            guard = Guard(cfg.guard, cfg.cluster, upstream)
            for service in guard.services():
                service.setServiceParent(self)
        self.agent = Agent(reactor, cfg.cluster, upstream, cfg.limits, guard)
        self.dialer = TunnelDialer(
            reactor, relay_url=cfg.relay.url, path=AGENT_PATH,
            credential=cfg.relay.credential, make_session=self.agent.make_session,
            tls_options=cfg.relay.tls_options(), transport=cfg.relay.transport,
            extra_headers={"Arc-Cluster": cfg.cluster, "Arc-Version": __version__},
            what="agent",
            ws_mask=cfg.relay.websocket_mask, proxy=cfg.relay.proxy,
            backoff=cfg.relay.backoff(), drain_timeout=cfg.limits.drain_timeout)
        # A tunnel to every relay replica, each a copy of this dialer pinned
        # to one address (arc.tunnel.replicas).
        self.dialer = replica_dialers(reactor, cfg.relay, self.dialer.pinned)
        self.dialer.setServiceParent(self)
        if cfg.metrics is not None:
            from arc.ops.tunnelend import tunnel_end_metrics
            service, self.agent.stream_observer = tunnel_end_metrics(
                "agent", cfg.metrics, reactor, self.dialer, guard=guard, file=cfg.file)
            service.setServiceParent(self)
        credential_service = getattr(cfg.relay.credential, "service", None)
        if credential_service is not None:
            credential_service().setServiceParent(self)

    def stopService(self):
        # Drain the tunnel first, so that the guard (audit, credentials) keeps
        # serving the running streams until they end or the deadline passes.
        d = self.dialer.drain()
        d.addBoth(lambda _: super(AgentService, self).stopService())
        return d


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    allocator.tune()
    cfg, target = parsed_config(options, Options.loader)
    return AgentService(cfg, target, reactor)

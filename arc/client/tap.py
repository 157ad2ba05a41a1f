"""``twistd arc-client --config client.yaml``."""

import base64
import os
import signal

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from arc import allocator
from arc.client.config import load_client_config
from arc.client.control import control_factory
from arc.errors import ConfigError
from arc.client.localca import ensure_local_ca
from arc.client.proxy import KubectlFactory
from arc.kube.kubeconfig import default_kubeconfig_path, merge_context
from arc.relay.relay import CLIENT_PATH
from arc.service import ConfigOptions, bound_port, listen_service, parsed_config
from arc.tunnel.dial import TunnelDialer
from arc.tunnel.session import Session


class Options(ConfigOptions):
    synopsis = "--config client.yaml"
    longdesc = ("Run the arc client proxy: serves kubectl on a local TLS port and carries "
                "every connection over the tunnel to the relay.")
    loader = staticmethod(load_client_config)


def _server_url(port):
    host = port.getHost()
    address = host.host
    if ":" in address:
        address = "[%s]" % address
    if address in ("0.0.0.0", "[::]"):
        address = "127.0.0.1"
    return "https://%s:%d" % (address, host.port)


class ProxyService(MultiService):
    """The client proxy: local listeners, one tunnel, kubeconfig contexts."""

    log = Logger()
    # Told ``watch(stream)`` of every stream opened (arc.ops.tunnelend); None: nobody.
    stream_observer = None

    def __init__(self, cfg, reactor):
        super().__init__()
        self.config = cfg
        self.reactor = reactor
        self.config_file = cfg.file
        self.relay_url = cfg.relay.url
        self.head_timeout = cfg.head_timeout
        self.clusters = {c.name: c for c in cfg.clusters}
        self.local_ca = ensure_local_ca(cfg.state_dir)
        self.sessions = set()
        tls = self.local_ca.tls_options()
        self.listener = listen_service(reactor, cfg.listen, KubectlFactory(self), tls,
                                       file=cfg.file)
        self.listener.setServiceParent(self)
        self.dedicated = {}
        for cluster in cfg.clusters:
            if cluster.listen:
                service = listen_service(reactor, cluster.listen,
                                         KubectlFactory(self, cluster.name), tls,
                                         file=cfg.file, key="clusters.%s.listen" % cluster.name)
                service.setServiceParent(self)
                self.dedicated[cluster.name] = service
        self.dialer = TunnelDialer(
            reactor, relay_url=cfg.relay.url, path=CLIENT_PATH, credential=cfg.relay.credential,
            make_session=self._make_session, tls_options=cfg.relay.tls_options(),
            transport=cfg.relay.transport, what="user", ws_mask=cfg.relay.websocket_mask,
            proxy=cfg.relay.proxy, backoff=cfg.relay.backoff(),
            drain_timeout=cfg.limits.drain_timeout,
            # One tunnel is enough (any relay replica serves any cluster); with
            # relay.addresses each new attempt goes to the next replica.
            addresses=cfg.relay.addresses or None)
        self.dialer.setServiceParent(self)
        credential_service = getattr(cfg.relay.credential, "service", None)
        if credential_service is not None:
            credential_service().setServiceParent(self)
        self.kubeconfig_path = cfg.kubeconfig or default_kubeconfig_path()
        self.ready = defer.Deferred()
        self.port = None
        self.servers = {}          # cluster -> server URL written into the kubeconfig
        if cfg.control:
            listen_service(reactor, cfg.control, control_factory(self), None, file=cfg.file,
                           key="control").setServiceParent(self)
        if cfg.metrics is not None:
            from arc.ops.tunnelend import tunnel_end_metrics
            service, self.stream_observer = tunnel_end_metrics(
                "client", cfg.metrics, reactor, self.dialer, file=cfg.file)
            service.setServiceParent(self)

    def _make_session(self):
        session = Session(dialer=True, clock=self.reactor, limits=self.config.limits,
                          name="relay", on_close=lambda s, code, reason: self.sessions.discard(s))
        self.sessions.add(session)
        return session

    def session(self):
        """The live tunnel session that may open streams, if any."""
        for session in self.sessions:
            if session.can_open():
                return session
        return None

    def tunnel_problem(self):
        if any(s.remote_goaway and not s.closed for s in self.sessions):
            return "the relay is shutting down; the client reconnects once it is back"
        return self.dialer.last_error or "connecting"

    def startService(self):
        super().startService()
        d = self._write_kubeconfig(self.config.clusters)
        d.addCallbacks(self.ready.callback, self.ready.errback)
        if self.config.control:
            signal.signal(signal.SIGHUP,
                          lambda *_: self.reactor.callFromThread(self.reload))

    def reload(self):
        """Re-read the configuration's cluster list (``arc connect`` adds to it)."""
        try:
            cfg = load_client_config(self.config_file)
        except ConfigError as e:
            self.log.error("reload refused, keeping the running configuration: {error}",
                           error=str(e))
            return defer.succeed(None)
        added = [c for c in cfg.clusters if self.clusters.get(c.name) != c]
        self.clusters = {c.name: c for c in cfg.clusters}
        self.log.info("reloaded {file}: {n} clusters", file=self.config_file, n=len(cfg.clusters))
        return self._write_kubeconfig(added)

    def cluster_entry(self, cluster, port):
        ca_data = base64.b64encode(self.local_ca.ca_cert_pem).decode("ascii")
        return {"server": _server_url(port), "certificate-authority-data": ca_data,
                "tls-server-name": self.local_ca.server_name(cluster.name)}

    @staticmethod
    def user_entry(cluster):
        if cluster.kubeconfig_user is not None:
            return cluster.kubeconfig_user
        return {"tokenFile": cluster.token_file} if cluster.token_file else {}

    @defer.inlineCallbacks
    def _write_kubeconfig(self, clusters):
        main = yield bound_port(self.listener)
        self.port = main.getHost().port
        for cluster in clusters:
            port = main
            if cluster.name in self.dedicated:
                port = yield bound_port(self.dedicated[cluster.name])
            entry = self.cluster_entry(cluster, port)
            self.servers[cluster.name] = entry["server"]
            if not cluster.write_kubeconfig:
                continue
            merge_context(self.kubeconfig_path, context=cluster.context, cluster_entry=entry,
                          user_entry=self.user_entry(cluster),
                          set_current=self.config.set_current_context
                          and cluster is self.config.clusters[0])
            self.log.info("kubeconfig {path}: context {context} -> cluster {cluster} via "
                          "{server}", path=self.kubeconfig_path, context=cluster.context,
                          cluster=cluster.name, server=entry["server"])
        return self.kubeconfig_path

    def status(self):
        """What ``arc status`` shows."""
        session = self.session()
        return {
            "pid": os.getpid(),
            "relay": self.relay_url,
            "tunnel": "up" if session is not None else "down",
            "last_error": self.dialer.last_error,
            "rtt_ms": round(session.rtt * 1000, 3) if session is not None and session.rtt
            else None,
            "streams": len(session.streams) if session is not None else 0,
            "kubeconfig": self.kubeconfig_path,
            "clusters": [{"name": c.name, "context": c.context,
                          "server": self.servers.get(c.name)}
                         for c in self.clusters.values()],
        }


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    allocator.tune()
    return ProxyService(parsed_config(options, load_client_config), reactor)

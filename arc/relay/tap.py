"""``twistd arc-relay --config relay.yaml``."""

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from arc import allocator
from arc.ops.relaywatch import RelayWatch
from arc.ops.statuspage import StatusPage
from arc.relay.config import load_relay_config
from arc.relay.relay import Relay
from arc.relay.reload import RegistryReloader
from arc.service import ConfigOptions, bound_port, listen_service, parsed_config
from arc.tls import server_options_from_files
from arc.tunnel.carrier import TunnelServerFactory


class Options(ConfigOptions):
    synopsis = "--config relay.yaml"
    longdesc = ("Run an arc relay: accepts agent and client tunnels and pairs their streams.  "
                "Clusters, users and bindings are re-read when the file changes and on SIGHUP.")
    optParameters = ConfigOptions.optParameters + [
        ["reload-interval", None, 5.0, "seconds between checks of the configuration file for "
                                       "changes (0: only on SIGHUP)", float]]
    loader = staticmethod(load_relay_config)

    def postOptions(self):
        if self["reload-interval"] < 0:
            raise usage.UsageError("--reload-interval must be 0 (only on SIGHUP) or a number "
                                   "of seconds, not %s" % (self["reload-interval"],))
        super().postOptions()


class RelayService(MultiService):
    log = Logger()

    def __init__(self, cfg, reactor, reload_interval=5.0):
        super().__init__()
        self.config = cfg
        self.relay = Relay(reactor, cfg.registry, cfg.limits, cfg.authenticator,
                           **({"relay_limits": cfg.relay_limits} if cfg.relay_limits else {}))
        if cfg.authenticator is not None:
            for service in cfg.authenticator.services():
                service.setServiceParent(self)
        tls = None
        if cfg.tls_cert:
            tls = server_options_from_files(cfg.tls_cert, cfg.tls_key, file=cfg.file)
        else:
            self.log.warn("relay serves plain HTTP (insecure_plaintext): only behind a "
                          "TLS-terminating proxy")
        # What operators see: tunnels, streams and refusals, the status page.
        self.watch = RelayWatch(self.relay)
        page = StatusPage(self.watch, cfg.status, self.relay.plain)
        factory = TunnelServerFactory(reactor, self.watch.accept, page.plain,
                                      head_timeout=cfg.head_timeout,
                                      require_mask=cfg.websocket_require_mask)
        self.listener = listen_service(reactor, cfg.listen, factory, tls, file=cfg.file)
        self.listener.setServiceParent(self)
        if cfg.metrics is not None:
            from arc.ops.relaymetrics import relay_metrics
            relay_metrics(cfg.metrics, reactor, self.watch, self.listener,
                          file=cfg.file).setServiceParent(self)
        self.reloader = RegistryReloader(cfg.file, self.relay, reactor, interval=reload_interval)
        self.reloader.setServiceParent(self)

    def stopService(self):
        """GOAWAY to every tunnel, stop accepting, let running streams finish (bounded)."""
        self.relay.stopping()
        stopped = super().stopService()
        drained = self.relay.drain(self.config.limits.drain_timeout)
        return defer.gatherResults([stopped, drained])

    def bound(self):
        """Deferred firing with the bound port number (for port 0 in tests)."""
        return bound_port(self.listener).addCallback(lambda port: port.getHost().port)


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    allocator.tune()
    return RelayService(parsed_config(options, load_relay_config), reactor,
                        reload_interval=options.get("reload-interval", 5.0))

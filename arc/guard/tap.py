"""``twistd arc-guard --config guard.yaml``: the guard alone, on a TLS port.

The same guard the agent runs in process (:mod:`arc.guard.proxy`), serving
each accepted TLS connection instead of each tunnel stream; the peer in
audit records is the socket's address.  The file (see etc/guard.yaml)::

    cluster: prod-eu                     # name in audit records and messages
    listen: "tcp:6443:interface=0.0.0.0" # a Twisted endpoint string (tcp: or unix:)
    tls: {cert_file: guard.crt, key_file: guard.key}   # required
    upstream: {kubeconfig: ..., context: ..., connect_timeout: 10}   # as in agent.yaml
    guard: {identity: ..., allow_impersonation: ..., audit: ..., token_refresh: ...}
    metrics: {listen: "tcp:9090:interface=127.0.0.1"}   # optional: /metrics, /healthz, /readyz

The ``guard:`` section is parsed by :func:`arc.guard.guard.parse_guard`, so
its keys are exactly those of agent.yaml's ``guard:`` section.  SIGHUP
reopens an audit file (after log rotation moved it).
"""

import signal
import threading
from dataclasses import dataclass
from typing import Optional

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from arc import allocator
from arc import config
from arc.guard import sar
from arc.guard.guard import Guard, GuardConfig, load_target, parse_guard
from arc.guard.upstream import APIServer
from arc.metrics import parse_metrics
from arc.service import ConfigOptions, bound_port, listen_service, parsed_config
from arc.tls import server_options_from_files


@dataclass(frozen=True)
class GuardFileConfig:
    file: str
    cluster: str
    listen: str
    tls_cert: str
    tls_key: str
    kubeconfig: Optional[str]
    context: Optional[str]
    connect_timeout: float
    guard: GuardConfig
    metrics: object = None     # arc.metrics.MetricsSettings, or None


def load_guard_config(path):
    """The checked contents of a guard.yaml; raises ConfigError naming file and key."""
    node = config.load(path)
    cluster = config.cluster_name(node, "cluster", node.get("cluster", str))
    listen = node.get("listen", str, "tcp:6443")
    if listen.startswith("ssl:"):
        raise node.error("listen", "give a tcp: (or unix:) endpoint; TLS comes from the tls: "
                                   "section so that ALPN is set")
    tls = node.section("tls", required=True)
    cert = tls.path("cert_file")
    key = tls.path("key_file")
    tls.finish()
    upstream = node.section("upstream")
    kubeconfig = upstream.path("kubeconfig", None)
    context = upstream.get("context", str, None)
    connect_timeout = upstream.positive("connect_timeout", float, 10.0)
    upstream.finish()
    guard = parse_guard(node)
    if not guard.enabled:
        raise node.error("guard.enabled", "the standalone guard cannot be disabled: remove "
                                          "guard.enabled (or stop running arc-guard)")
    metrics = parse_metrics(node)
    node.finish()
    return GuardFileConfig(file=node.file, cluster=cluster, listen=listen, tls_cert=cert,
                           tls_key=key, kubeconfig=kubeconfig, context=context,
                           connect_timeout=connect_timeout, guard=guard, metrics=metrics)


class Options(ConfigOptions):
    synopsis = "--config guard.yaml"
    longdesc = ("Run the arc guard alone: a TLS reverse proxy in front of kube-apiserver that "
                "authenticates every request, impersonates the caller (or passes its "
                "Kubernetes token through) and audits.")

    @staticmethod
    def loader(path):
        cfg = load_guard_config(path)
        target = load_target(cfg.file, cfg.kubeconfig, cfg.context, cfg.guard)
        return cfg, target


def describe_peer(addr):
    """``host:port`` of a TCP peer (IPv6 in brackets); a UNIX socket's path, or ``unix``."""
    if isinstance(addr, IPv6Address):
        return "[%s]:%d" % (addr.host, addr.port)
    if isinstance(addr, IPv4Address):
        return "%s:%d" % (addr.host, addr.port)
    if isinstance(addr, UNIXAddress):
        name = addr.name
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return name or "unix"
    return str(addr or "")


class GuardServerFactory(Factory):
    """One GuardProtocol per accepted connection, named by its peer address."""

    def __init__(self, guard):
        self.guard = guard

    def buildProtocol(self, addr):
        return self.guard.protocol(peer=describe_peer(addr))


class GuardService(MultiService):
    """The listener, the guard's helper services, and SIGHUP to reopen the audit file."""

    log = Logger()

    def __init__(self, cfg, target, reactor):
        super().__init__()
        self.config = cfg
        self.reactor = reactor
        self._previous_hangup = None
        upstream = APIServer(reactor, target, cfg.connect_timeout)
        self.guard = Guard(cfg.guard, cfg.cluster, upstream)
        for service in self.guard.services():
            service.setServiceParent(self)
        tls = server_options_from_files(cfg.tls_cert, cfg.tls_key, file=cfg.file)
        self.listener = listen_service(reactor, cfg.listen, GuardServerFactory(self.guard), tls,
                                       file=cfg.file)
        self.listener.setServiceParent(self)
        if cfg.metrics is not None:
            from arc.ops.guardmetrics import guard_metrics
            guard_metrics(cfg.metrics, reactor, self.guard, self.listener,
                          file=cfg.file).setServiceParent(self)

    def startService(self):
        super().startService()
        if threading.current_thread() is threading.main_thread():
            # logrotate moves the audit file, then sends SIGHUP.
            previous = signal.signal(signal.SIGHUP, self._hangup)
            self._previous_hangup = signal.SIG_DFL if previous is None else previous

    def _hangup(self, signum, frame):
        self.reactor.callFromThread(self.reopen_audit)

    def reopen_audit(self):
        self.log.info("reopening the audit log {destination}",
                      destination=self.guard.audit.destination)
        self.guard.audit.reopen()

    def stopService(self):
        if self._previous_hangup is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
            self._previous_hangup = None
        d = super().stopService()
        d.addBoth(lambda result: sar.close_checker(self.guard).addBoth(lambda _: result))
        return d

    def bound(self):
        """Deferred firing with the bound port number (for port 0 in tests)."""
        return bound_port(self.listener).addCallback(lambda port: port.getHost().port)


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    allocator.tune()
    cfg, target = parsed_config(options, Options.loader)
    return GuardService(cfg, target, reactor)

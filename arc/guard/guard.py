"""The guard's settings and runtime: who is accepted, how, and where audit goes."""

from dataclasses import dataclass

from twisted.application.internet import TimerService
from twisted.logger import Logger

from arc.errors import ConfigError
from arc.guard.audit import parse_audit
from arc.guard.proxy import GuardProtocol
from arc.identity.authenticator import Authenticator, parse_identity
from arc.kube.kubeconfig import load_upstream


@dataclass(frozen=True)
class GuardConfig:
    enabled: bool
    authenticator: Authenticator
    allow_impersonation: bool
    audit: object
    token_refresh: float
    # A keep-alive connection idle between requests is closed after this
    # long (watch, exec, port-forward and logs are never cut: only the wait
    # for the next request is timed).
    idle_timeout: float = 300.0

    @property
    def impersonates(self):
        a = self.authenticator
        return bool(a.issuers) or a.static is not None


def parse_guard(node):
    """The ``guard:`` section (of agent.yaml or guard.yaml).

    Without an ``identity:`` section the guard runs in passthrough mode: the
    caller's Kubernetes token goes to the API server unchanged.
    """
    section = node.section("guard")
    enabled = section.get("enabled", bool, True)
    if section.has("identity"):
        authenticator = parse_identity(section.section("identity"))
    else:
        section.section("identity")
        authenticator = Authenticator(None, (), True)
    cfg = GuardConfig(
        enabled=enabled,
        authenticator=authenticator,
        allow_impersonation=section.get("allow_impersonation", bool, False),
        audit=parse_audit(section),
        token_refresh=section.positive("token_refresh", float, 60.0),
        idle_timeout=section.positive("idle_timeout", float, 300.0),
    )
    section.finish()
    return cfg


def load_target(cfg_file, kubeconfig, context, guard):
    """The API server (agent or standalone guard), checked against the guard's needs."""
    try:
        target = load_upstream(kubeconfig=kubeconfig, context=context)
    except ConfigError as e:
        if e.file is None:
            raise ConfigError(e.reason, file=cfg_file, key="upstream") from None
        raise
    if guard.enabled and guard.impersonates and not (
            target.token or target.token_file or target.client_cert_pem):
        raise ConfigError("the guard impersonates callers, so it needs credentials of its "
                          "own: the upstream (%s) has no token, token file or client "
                          "certificate" % (target.source,), file=cfg_file, key="guard.identity")
    return target


class Guard:
    """What every GuardProtocol of one process shares."""

    log = Logger()
    # Told ``request(record)`` of every finished request (arc.ops.guardmetrics).
    metrics = None

    def __init__(self, cfg, cluster, upstream):
        self.cfg = cfg
        self.cluster = cluster
        self.upstream = upstream
        self.authenticator = cfg.authenticator
        self.allow_impersonation = cfg.allow_impersonation
        self.audit = cfg.audit

    def protocol(self, peer=""):
        return GuardProtocol(self, peer)

    def services(self):
        """Services to run beside the guard: key refresh, token re-reading."""
        services = list(self.authenticator.services())
        services.append(self.audit)
        idle = getattr(self.upstream, "idle", None)
        if idle is not None:
            services.append(idle)       # idle API server connections, closed at the end
        if self.upstream.target.token_file:
            services.append(TimerService(self.cfg.token_refresh, self.upstream.refresh_token))
        return services

"""The relay's configuration file (see etc/relay.yaml)."""

from dataclasses import dataclass
from typing import Optional

from arc import config
from arc.identity.authenticator import parse_identity
from arc.metrics import parse_metrics
from arc.ops.statuspage import parse_status
from arc.relay.registry import Registry, parse_registry
from arc.relay.relay import parse_relay_limits
from arc.tunnel.session import Limits
from arc.tunnel.settings import parse_limits


@dataclass(frozen=True)
class RelayConfig:
    file: str
    listen: str
    tls_cert: Optional[str]
    tls_key: Optional[str]
    registry: Registry
    limits: Limits
    head_timeout: float
    websocket_require_mask: bool
    authenticator: object = None
    metrics: object = None     # arc.metrics.MetricsSettings, or None
    status: object = None      # arc.ops.statuspage.StatusSettings, or None (page off)
    relay_limits: object = None    # arc.relay.relay.RelayLimits (limits: section)


def load_relay_config(path):
    node = config.load(path)
    listen = node.get("listen", str, "tcp:8443")
    tls = node.section("tls")
    plaintext = node.get("insecure_plaintext", bool, False)
    cert = tls.path("cert_file", None)
    key = tls.path("key_file", None)
    tls.finish()
    if (cert is None) != (key is None):
        raise tls.error("cert_file" if cert is None else "key_file",
                        "give both tls.cert_file and tls.key_file")
    if cert is None and not plaintext:
        raise node.error("tls", "the relay serves TLS: give tls.cert_file and tls.key_file "
                                "(or insecure_plaintext: true behind a TLS-terminating proxy)")
    if listen.startswith("ssl:"):
        raise node.error("listen", "give a tcp: (or unix:) endpoint; TLS comes from the tls: "
                                   "section so that ALPN is set")
    authenticator = None
    if node.has("identity"):
        section = node.section("identity")
        if section.get("passthrough", bool, False):
            raise section.error("passthrough", "the relay cannot pass a token through: it "
                                               "must know the user to check the bindings")
        authenticator = parse_identity(section)
    else:
        node.section("identity")
    cfg = RelayConfig(
        file=node.file,
        listen=listen,
        tls_cert=cert,
        tls_key=key,
        registry=parse_registry(node),
        limits=parse_limits(node),
        head_timeout=node.positive("head_timeout", float, 10.0),
        websocket_require_mask=node.get("websocket_require_mask", bool, False),
        authenticator=authenticator,
        metrics=parse_metrics(node),
        status=parse_status(node),
        relay_limits=parse_relay_limits(node),
    )
    node.finish()
    return cfg

"""Configuration sections shared by every part that speaks the tunnel."""

from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

from arc.tunnel import frames as F
from arc.tunnel.session import Limits

TRANSPORTS = ("tunnel", "websocket")


def parse_limits(node):
    """The optional ``tunnel:`` section: keepalive and limits."""
    section = node.section("tunnel")
    limits = Limits(
        max_frame=section.positive("max_frame", int, F.DEFAULT_MAX_FRAME),
        max_streams=section.positive("max_streams", int, Limits.max_streams),
        ping_interval=section.positive("ping_interval", float, Limits.ping_interval),
        dead_after=section.positive("dead_after", float, Limits.dead_after),
        open_timeout=section.positive("open_timeout", float, Limits.open_timeout),
        drain_timeout=section.positive("drain_timeout", float, Limits.drain_timeout),
        max_pending_opens=section.positive("max_pending_opens", int,
                                           Limits.max_pending_opens),
        stream_window=section.positive("stream_window", int, Limits.stream_window),
    )
    if not F.INITIAL_WINDOW <= limits.stream_window <= 64 * 1024 * 1024:
        raise section.error("stream_window", "must be between %d (the protocol's initial "
                            "window) and 64 MiB" % (F.INITIAL_WINDOW,))
    if limits.max_frame > 16 * 1024 * 1024:
        raise section.error("max_frame", "must be at most 16 MiB")
    if limits.dead_after <= limits.ping_interval:
        raise section.error("dead_after", "must be longer than ping_interval (%s s)"
                            % limits.ping_interval)
    section.finish()
    return limits


@dataclass(frozen=True)
class RelayLink:
    """How an agent or a client reaches the relay."""

    url: str
    server_name: str
    ca_pem: Optional[bytes]
    credential: Callable[[], str]
    transport: str
    websocket_mask: bool
    proxy: Optional[str] = None
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    # Relay replicas: dial these addresses (TLS still checks the URL's name);
    # empty: resolve the URL's host name every resolve_interval seconds.
    addresses: tuple = ()
    resolve_interval: float = 30.0

    def backoff(self):
        """The reconnection policy: full jitter between these bounds."""
        from arc.tunnel.dial import full_jitter
        return full_jitter(self.reconnect_initial, self.reconnect_max)

    def tls_options(self):
        from arc.tls import client_options
        return client_options(self.server_name, ca_pem=self.ca_pem)


def parse_relay_link(node):
    """The ``relay:`` section of agent and client configurations."""
    section = node.section("relay", required=True)
    url = section.get("url", str)
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise section.error("url", "must look like https://relay.example.com[:port], not %r"
                            % (url,))
    if parts.path not in ("", "/"):
        raise section.error("url", "must not carry a path (the tunnel paths are fixed)")
    ca_path = section.path("ca_file", None)
    ca_pem = None
    if ca_path:
        with open(ca_path, "rb") as f:
            ca_pem = f.read()
        if b"-----BEGIN CERTIFICATE-----" not in ca_pem:
            raise section.error("ca_file", "%s holds no PEM certificate" % (ca_path,))
    if section.has("token_cache"):
        credential = _cached_token(section)
    elif section.has("token_command"):
        from arc.tunnel.credentials import CommandToken
        command = section.get("token_command", str)
        if not command.strip():
            raise section.error("token_command", "must name a command that prints the token")
        credential = CommandToken(command, section.positive("token_command_interval", float,
                                                            60.0))
    else:
        credential = section.secret("token")
    link = RelayLink(
        url=url,
        server_name=section.get("server_name", str, parts.hostname),
        ca_pem=ca_pem,
        credential=credential,
        transport=section.choice("transport", TRANSPORTS, "tunnel"),
        websocket_mask=section.get("websocket_mask", bool, True),
        proxy=section.get("proxy", str, None),
        reconnect_initial=section.positive("reconnect_initial", float,
                                           RelayLink.reconnect_initial),
        reconnect_max=section.positive("reconnect_max", float, RelayLink.reconnect_max),
        addresses=_addresses(section),
        resolve_interval=section.positive("resolve_interval", float,
                                          RelayLink.resolve_interval),
    )
    if link.reconnect_max < link.reconnect_initial:
        raise section.error("reconnect_max", "must be at least reconnect_initial (%s s)"
                            % link.reconnect_initial)
    if link.proxy not in (None, "none") and not link.proxy.startswith("http://"):
        raise section.error("proxy", "give an http:// proxy URL (CONNECT) or none, not %r"
                            % (link.proxy,))
    section.finish()
    return link


def _addresses(section):
    """``addresses:`` IP addresses of the relay replicas (optional)."""
    import ipaddress
    if not section.has("addresses"):
        return ()
    value = section.get("addresses", list)
    found = []
    for item in value:
        try:
            address = str(ipaddress.ip_address(str(item).strip("[]")))
        except ValueError:
            raise section.error("addresses", "give IP addresses of the relay replicas (the "
                                "certificate is checked against relay.url's host name), not "
                                "%r" % (item,)) from None
        if address not in found:
            found.append(address)
    if not found:
        raise section.error("addresses", "is empty: leave it out to resolve relay.url's host "
                            "name instead")
    return tuple(found)


def _cached_token(section):
    """``token_cache:`` a login cache (JSON with ``id_token``) kept fresh by ``arc token``."""
    import json
    path = section.path("token_cache", must_exist=False)

    def read():
        from arc.errors import ConfigError
        try:
            with open(path, encoding="utf-8") as f:
                token = json.load(f).get("id_token")
        except (OSError, ValueError) as e:
            raise ConfigError("cannot read the login cache: %s; run \"arc login\""
                              % (getattr(e, "strerror", None) or e,), file=path)
        if not token:
            raise ConfigError("the login cache holds no token; run \"arc login\"", file=path)
        return token

    return read

"""Settings of one OIDC issuer, and their parsing from a configuration section.

``identity.oidc[N]`` of a configuration file::

    issuer: https://login.example.com/tenant/v2.0    # https only; exact `iss`
    client_id: arc                   # must be in the token's `aud`
    username_claim: email            # default sub
    username_prefix: ""              # default "<issuer>#" ("" for email)
    groups_claim: groups             # default groups
    groups_prefix: "oidc:"           # default ""
    ca_file: idp-ca.crt              # default: the system's trust store
    algorithms: [RS256, ES256]       # default: all RS*, ES*, PS*
    jwks_refresh: 3600               # seconds between key set refreshes
    kid_refetch_interval: 60         # at most one refetch per interval on unknown kid
    max_document_size: 1048576       # bytes of discovery document / JWKS
    fetch_timeout: 10                # seconds per discovery or JWKS fetch
    extra_claims: {acr: example.com/acr}   # claim -> Impersonate-Extra key
"""

from dataclasses import dataclass
from urllib.parse import urlsplit

from arc.errors import ConfigError
from arc.identity.jws import ASYMMETRIC
from arc.identity.model import EXTRA_ISSUER, EXTRA_SUBJECT, RESERVED_EXTRA_PREFIX

LEEWAY = 60.0
_TLS_MARKER = b"-----BEGIN CERTIFICATE-----"


def https_url_problem(url):
    """Why ``url`` cannot name an issuer (None if it can)."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return "is not a URL (%s)" % (e,)
    if parts.scheme != "https":
        return ("must be an https:// URL (keys fetched over plain HTTP could be replaced by "
                "anyone on the path), not %r" % (url,))
    if not parts.hostname:
        return "names no host: %r" % (url,)
    if parts.username is not None or parts.password is not None:
        return "must not hold a user name or password"
    if parts.query or parts.fragment:
        return "must not have a query or fragment (the issuer is compared exactly with `iss`)"
    return None


def _check_algorithms(algorithms):
    if not algorithms:
        return "must list at least one algorithm"
    for alg in algorithms:
        if alg.upper().startswith("HS") or alg.lower() == "none":
            return ("%r is never accepted: a shared-secret (HMAC) or unsigned token could be "
                    "forged by anyone who knows the issuer's public key; use the identity "
                    "provider's asymmetric algorithms (%s)" % (alg, ", ".join(ASYMMETRIC)))
        if alg not in ASYMMETRIC:
            return "%r is not supported; choose among %s" % (alg, ", ".join(ASYMMETRIC))
    return None


def _check_extra_key(key):
    if not key or key != key.lower() or any(c.isspace() for c in key):
        return "extra keys must be non-empty, lower-case and without spaces, not %r" % (key,)
    if key.startswith(RESERVED_EXTRA_PREFIX):
        return ("%r is reserved: arc sets %s and %s itself; choose a key under your own domain"
                % (key, EXTRA_ISSUER, EXTRA_SUBJECT))
    return None


@dataclass(frozen=True)
class IssuerSettings:
    """Validated settings of one issuer (see the module docstring for meanings)."""

    issuer: str
    client_id: str
    username_claim: str = "sub"
    username_prefix: str = None
    groups_claim: str = "groups"
    groups_prefix: str = ""
    ca_pem: bytes = None
    algorithms: tuple = ASYMMETRIC
    jwks_refresh: float = 3600.0
    kid_refetch_interval: float = 60.0
    max_document_size: int = 1024 * 1024
    fetch_timeout: float = 10.0
    extra_claims: tuple = ()         # ((claim, extra key), ...)
    leeway: float = LEEWAY

    def __post_init__(self):
        problem = https_url_problem(self.issuer)
        if problem:
            raise ConfigError("issuer " + problem)
        if not self.client_id:
            raise ConfigError("client_id must not be empty")
        problem = _check_algorithms(self.algorithms)
        if problem:
            raise ConfigError("algorithms: " + problem)
        for _, key in self.extra_claims:
            problem = _check_extra_key(key)
            if problem:
                raise ConfigError("extra_claims: " + problem)
        if self.username_prefix is None:
            default = "" if self.username_claim == "email" else self.issuer + "#"
            object.__setattr__(self, "username_prefix", default)
        object.__setattr__(self, "algorithms", tuple(self.algorithms))

    @property
    def discovery_url(self):
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


def _read_ca(node, name):
    path = node.path(name, None)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise node.error(name, "cannot read %s: %s" % (path, e.strerror)) from None
    if _TLS_MARKER not in data:
        raise node.error(name, "%s holds no PEM certificate; give the CA bundle that signed "
                               "the identity provider's HTTPS certificate" % (path,))
    return data


def parse_issuer(node):
    """:class:`IssuerSettings` from one ``identity.oidc[N]`` Node."""
    issuer = node.get("issuer", str)
    problem = https_url_problem(issuer)
    if problem:
        raise node.error("issuer", problem)
    client_id = node.get("client_id", str)
    if not client_id:
        raise node.error("client_id", "must not be empty: give the client (application) id "
                                      "the identity provider puts in the token's `aud`")
    username_claim = node.get("username_claim", str, "sub")
    if not username_claim:
        raise node.error("username_claim", "must not be empty (usually sub or email)")
    username_prefix = node.get("username_prefix", str, None)
    groups_claim = node.get("groups_claim", str, "groups")
    if not groups_claim:
        raise node.error("groups_claim", "must not be empty (usually groups)")
    groups_prefix = node.get("groups_prefix", str, "")
    if groups_prefix.startswith("system:") or (username_prefix or "").startswith("system:"):
        raise node.error("groups_prefix" if groups_prefix.startswith("system:")
                         else "username_prefix", "prefixes must not start with 'system:', which "
                         "Kubernetes reserves")
    ca_pem = _read_ca(node, "ca_file")
    algorithms = node.strings("algorithms", ASYMMETRIC)
    problem = _check_algorithms(algorithms)
    if problem:
        raise node.error("algorithms", problem)
    extra = []
    extra_node = node.section("extra_claims")
    for claim, key in extra_node.data.items():
        if not isinstance(key, str):
            raise extra_node.error(claim, "must be a string: the extra key to record the claim "
                                          "under")
        problem = _check_extra_key(key)
        if problem:
            raise extra_node.error(claim, problem)
        extra.append((str(claim), key))
    leeway = node.get("clock_skew", float, LEEWAY)
    if not 0 <= leeway <= LEEWAY:
        raise node.error("clock_skew", "must be between 0 and %d seconds" % LEEWAY)
    settings = IssuerSettings(
        leeway=leeway,
        issuer=issuer,
        client_id=client_id,
        username_claim=username_claim,
        username_prefix=username_prefix,
        groups_claim=groups_claim,
        groups_prefix=groups_prefix,
        ca_pem=ca_pem,
        algorithms=algorithms,
        jwks_refresh=float(node.positive("jwks_refresh", float, 3600.0)),
        kid_refetch_interval=float(node.positive("kid_refetch_interval", float, 60.0)),
        max_document_size=node.positive("max_document_size", int, 1024 * 1024),
        fetch_timeout=float(node.positive("fetch_timeout", float, 10.0)),
        extra_claims=tuple(extra),
    )
    node.finish()
    return settings

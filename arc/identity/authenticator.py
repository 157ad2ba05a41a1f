"""The one entry point for "who sent this token?", shared by relay and guard.

Order: static tokens, then the OIDC issuer the token claims to come from
(its verdict is final: a token claiming to be from a configured issuer but
failing verification is refused, never passed through), then passthrough
(the caller forwards the token unchanged for the Kubernetes API server to
judge) if enabled, else refusal.

Configuration (section ``identity``)::

    identity:
      static:                      # optional: name -> {token_sha256, groups}
        ci: {token_sha256: "<hex>", groups: [deployers]}
      oidc:                        # optional: list of issuers (see arc.identity.settings)
        - issuer: https://login.example.com/tenant/v2.0
          client_id: arc
      passthrough: false           # forward other tokens unchanged
"""

import base64
import hashlib
import json
import re

from twisted.internet.defer import Deferred, fail, succeed

from arc.identity.jws import looks_like_jwt, unverified_issuer
from arc.identity.model import AuthError
from arc.identity.oidc import OIDCIssuer
from arc.identity.settings import parse_issuer
from arc.identity.static import parse_static

_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class _Passthrough:
    """The verdict "not ours to judge: forward the token unchanged"."""

    def __repr__(self):
        return "PASSTHROUGH"

    def __bool__(self):
        return False


#: Returned by :meth:`Authenticator.authenticate` in passthrough mode for a
#: token that is neither a static token nor from a configured issuer.
PASSTHROUGH = _Passthrough()


def bearer_from_header(value):
    """The token of an ``Authorization`` header value; raises AuthError.

    ``value`` is a str or bytes, or the list of values of a header sent more
    than once (refused).  The scheme is case-insensitive; exactly one token
    must follow it.
    """
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            raise AuthError("malformed", "the request has more than one Authorization header; "
                                         "send exactly one `Authorization: Bearer <token>`")
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value is None or not value.strip():
        raise AuthError("missing", "no credentials were sent; send "
                                   "`Authorization: Bearer <token>` (run `arc login`)")
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("malformed", "the Authorization header does not use the Bearer scheme; "
                                     "send `Authorization: Bearer <token>`")
    token = rest.strip()
    if not token:
        raise AuthError("missing", "the Authorization header holds no token after `Bearer`; "
                                   "send `Authorization: Bearer <token>`")
    if not _B64TOKEN.fullmatch(token):
        raise AuthError("malformed", "the Authorization header holds more than one value or "
                                     "characters a bearer token cannot contain; send exactly "
                                     "`Authorization: Bearer <token>`")
    return token


def _unverified_exp(token):
    """The ``exp`` of a token that was just verified (so its payload is sound)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None
    except (ValueError, IndexError, AttributeError):
        return None


class Authenticator:
    """Static tokens, OIDC issuers and passthrough, in that order.

    :param static: a :class:`~arc.identity.static.StaticTokens` or None.
    :param issuers: :class:`~arc.identity.oidc.OIDCIssuer` objects, one per issuer.
    :param passthrough: forward tokens nobody here can judge (see :data:`PASSTHROUGH`).
    """

    #: Verified ID tokens are remembered this long (and never past their ``exp``):
    #: kubectl sends the same token with every request, and a signature check
    #: costs more than the rest of the request's handling.
    cache_seconds = 30.0
    cache_size = 10000

    def __init__(self, static=None, issuers=(), passthrough=False):
        self.static = static
        self.issuers = {issuer.issuer: issuer for issuer in issuers}
        if len(self.issuers) != len(list(issuers)):
            raise ValueError("two OIDC issuers share an issuer URL")
        self.passthrough = passthrough
        self._verified = {}   # sha256(token) -> (principal, valid until, issuer)

    def authenticate(self, token):
        """Deferred firing with a Principal or :data:`PASSTHROUGH`; fails with AuthError."""
        try:
            verdict = self.verdict(token)
        except AuthError:
            return fail()
        if isinstance(verdict, Deferred):
            return verdict
        return succeed(verdict)

    def verdict(self, token):
        """:meth:`authenticate` without a Deferred when none is needed.

        Returns a Principal or :data:`PASSTHROUGH` when the answer is known at
        once (static tokens, passthrough, an ID token verified a moment ago),
        raises AuthError for a refusal known at once, and otherwise returns a
        Deferred as :meth:`authenticate` does.
        """
        if not token:
            raise AuthError("missing", "no token was sent; send "
                                       "`Authorization: Bearer <token>` (run `arc login`)")
        if self.static is not None:
            principal = self.static.authenticate(token)
            if principal is not None:
                return principal
        if self.issuers:
            key = hashlib.sha256(token.encode("utf-8", "replace")).digest()
            hit = self._verified.get(key)
            # An entry exists only for a token that verified: the same token
            # goes to the same issuer again, so the entry answers for it.
            if hit is not None and hit[1] > hit[2].clock.seconds():
                return hit[0]
            if looks_like_jwt(token):
                issuer = self.issuers.get(unverified_issuer(token))
                if issuer is not None:
                    now = issuer.clock.seconds()
                    return issuer.authenticate(token).addCallback(self._remember, key, token,
                                                                  now, issuer)
        if self.passthrough:
            return PASSTHROUGH
        raise AuthError("unknown_token", "the token is not one this server accepts (no "
                                         "static token matches%s); get a token with "
                                         "`arc login`" % (self._issuers_text(),))

    def _remember(self, principal, key, token, now, issuer):
        until = now + self.cache_seconds
        exp = _unverified_exp(token)
        if exp is not None:
            until = min(until, exp)
        if len(self._verified) >= self.cache_size:
            # Drop the oldest entries (dicts keep insertion order).
            for old in list(self._verified)[:self.cache_size // 10 or 1]:
                del self._verified[old]
        self._verified[key] = (principal, until, issuer)
        return principal

    def _issuers_text(self):
        if not self.issuers:
            return ""
        return " and it is not an ID token from %s" % (", ".join(sorted(self.issuers)),)

    def services(self):
        """Services keeping the issuers' keys fresh: add them to a MultiService."""
        return [issuer.service() for issuer in self.issuers.values()]


def parse_identity(node, *, reactor=None, clock=None):
    """An :class:`Authenticator` from the ``identity`` section ``node`` (a Node).

    Raises ConfigError when nothing is configured (no static tokens, no
    issuer, passthrough off) since such a server would refuse everyone.
    """
    static = parse_static(node, "static") if node.has("static") else None
    issuers = []
    seen = {}
    for entry in node.list_of_nodes("oidc"):
        settings = parse_issuer(entry)
        if settings.issuer in seen:
            raise entry.error("issuer", "issuer %s is already configured at %s; list each "
                                        "issuer once" % (settings.issuer, seen[settings.issuer]))
        seen[settings.issuer] = entry.prefix.rstrip(".")
        issuers.append(OIDCIssuer(settings, reactor=reactor, clock=clock))
    passthrough = node.get("passthrough", bool, False)
    node.finish()
    if not issuers and not passthrough and (static is None or not len(static)):
        raise node.error("oidc", "nothing would be accepted: configure OIDC issuers under "
                                 "oidc:, static tokens under static:, or set passthrough: true")
    return Authenticator(static, issuers, passthrough)

"""Who a caller is, once a token has been checked, and why a token was refused.

A :class:`Principal` is what both users of :mod:`arc.identity` act on: the
relay authorizes tunnel streams with it, the guard impersonates it.  An
:class:`AuthError` carries a machine-readable ``code`` (for metrics and the
audit log) and a ``reason`` a person can act on.  Neither ever holds the
token itself.
"""

from dataclasses import dataclass, field

OIDC = "oidc"
STATIC = "static"

#: ``extra`` keys every OIDC principal carries (lower-case, as Kubernetes wants).
EXTRA_ISSUER = "arc.dev/issuer"
EXTRA_SUBJECT = "arc.dev/subject"
RESERVED_EXTRA_PREFIX = "arc.dev/"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``groups`` is a tuple of names (prefixes already applied); ``extra`` maps
    lower-case keys to tuples of strings; ``method`` is ``"oidc"`` or
    ``"static"``.  For static tokens ``issuer`` is empty and ``subject`` is the
    configured user name.
    """

    username: str
    groups: tuple = ()
    extra: dict = field(default_factory=dict)
    issuer: str = ""
    subject: str = ""
    method: str = STATIC

    def describe(self):
        """One line for logs: who, how, which groups.  Holds no credential."""
        text = "user %r (%s" % (self.username, self.method)
        if self.issuer:
            text += " from %s" % (self.issuer,)
        text += ")"
        if self.groups:
            text += " groups %s" % (", ".join(repr(g) for g in self.groups),)
        return text


class AuthError(Exception):
    """A token was refused.

    ``code`` is one short word for metrics and audit records (``missing``,
    ``malformed``, ``bad_algorithm``, ``expired``, ``not_yet_valid``,
    ``bad_signature``, ``wrong_issuer``, ``wrong_audience``, ``missing_claim``,
    ``bad_claim``, ``unknown_key``, ``overage``, ``forbidden_identity``,
    ``unknown_token``, ``idp_unavailable``); ``reason`` names the cause and the
    fix.  Neither contains the token.
    """

    def __init__(self, code, reason):
        self.code = code
        self.reason = reason
        super().__init__(code, reason)

    def __str__(self):
        return self.reason

    def __repr__(self):
        return "AuthError(%r, %r)" % (self.code, self.reason)


def shorten(value, limit=80):
    """``repr`` of a claim value cut to ``limit`` characters, for messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text

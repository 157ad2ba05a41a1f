"""Who is calling the API server emulator, and what they may do.

Bearer tokens map to users; ``Impersonate-*`` headers switch to another
identity when, and only when, the authenticated user is a configured
impersonator, as a real API server with RBAC on ``impersonate`` would do.
Users listed as denied may look at discovery and ask who they are, and are
refused everything else, which lets tests provoke RBAC-style 403 answers.

``SubjectAccessReview`` questions about impersonation (what a proxy asks
before it sends ``Impersonate-*`` headers on someone's behalf) are answered
from separate rules, L{ImpersonationRule}s.
"""

from dataclasses import dataclass, field
from urllib.parse import unquote

from arc.errors import ConfigError
from arc.testing.apistatus import badRequest, forbidden, unauthorized

AUTHENTICATED = "system:authenticated"
MASTERS = "system:masters"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"

_USER = b"impersonate-user"
_GROUP = b"impersonate-group"
_UID = b"impersonate-uid"
_EXTRA = b"impersonate-extra-"


@dataclass(frozen=True)
class UserInfo:
    """An identity as the API server sees it (``authentication.k8s.io/v1``)."""

    username: str
    groups: tuple = ()
    uid: str = ""
    extra: dict = field(default_factory=dict)

    def toJSON(self):
        """The ``UserInfo`` object of a ``SelfSubjectReview``."""
        info = {"username": self.username, "groups": list(self.groups)}
        if self.uid:
            info["uid"] = self.uid
        if self.extra:
            info["extra"] = {key: list(values) for key, values in self.extra.items()}
        return info


def parseTokenSpec(spec):
    """Parse ``TOKEN=USER[:GROUP,GROUP...]`` into ``(token, UserInfo)``.

    The user name ends at the first colon, so ``t=admin:system:masters``
    names the user ``admin`` in the group ``system:masters``.
    """
    token, sep, identity = spec.partition("=")
    username, _, groups = identity.partition(":")
    if not sep or not token or not username:
        raise ConfigError(
            f"{spec!r} is not TOKEN=USER[:GROUP,GROUP...]; "
            "for example admin-token=admin:system:masters",
            key="--token",
        )
    return token, UserInfo(username, tuple(g for g in groups.split(",") if g))


@dataclass(frozen=True)
class ImpersonationRule:
    """C{user} may impersonate the user or group C{target}; ``*`` matches any."""

    user: str
    target: str

    def __str__(self):
        return f"{self.user}={self.target}"

    def allows(self, user, target):
        return self.user in ("*", user) and self.target in ("*", target)


def parseImpersonationRule(spec):
    """Parse ``USER=TARGET`` (either may be ``*``) into an L{ImpersonationRule}."""
    user, sep, target = spec.partition("=")
    if not sep or not user or not target:
        raise ConfigError(
            f"{spec!r} is not USER=TARGET; for example guard=alice, or guard=* for anyone",
            key="--allow-impersonate",
        )
    return ImpersonationRule(user, target)


def impersonationTarget(attributes):
    """Whom an ``impersonate`` question's ``resourceAttributes`` name.

    Users and groups are named as they are, service accounts by their user
    names (``system:serviceaccount:NS:NAME``); uids and extra values can
    only be allowed by a ``*`` rule, so their target is ``*``.

    @return: the target for L{ImpersonationRule.allows}, or C{None} for a
        question that is not about impersonation.
    """
    if attributes.get("verb") != "impersonate":
        return None
    resource, name = attributes.get("resource"), attributes.get("name", "")
    if resource in ("users", "groups"):
        return name
    if resource == "serviceaccounts":
        return f"{SERVICE_ACCOUNT_PREFIX}{attributes.get('namespace', '')}:{name}"
    if resource in ("uids", "userextras"):
        return "*"
    return None


class Authenticator:
    """Resolve the caller of a request and decide whether it may act.

    @param tokens: mapping of bearer token to the L{UserInfo} it proves.
    @param impersonators: user names allowed to send ``Impersonate-*``.
    @param deniedUsers: user names refused everything but discovery and
        questions about themselves.
    @param impersonationRules: the L{ImpersonationRule}s access reviews
        answer from.
    """

    def __init__(self, tokens, impersonators=(), deniedUsers=(), impersonationRules=()):
        self._tokens = dict(tokens)
        self._impersonators = frozenset(impersonators)
        self._denied = frozenset(deniedUsers)
        self._rules = tuple(impersonationRules)

    def authenticate(self, headers):
        """The L{UserInfo} proven by the request's bearer token.

        @param headers: the request's L{twisted.web.http_headers.Headers}.
        @raise StatusError: 401 when the token is missing or unknown.
        """
        values = headers.getRawHeaders(b"authorization", [])
        if len(values) != 1:
            raise unauthorized()
        scheme, _, token = values[0].decode("latin-1").partition(" ")
        user = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise unauthorized()
        return _withAuthenticated(user.username, user.groups)

    def impersonate(self, user, headers):
        """The identity the request acts as: C{user}, or whom it impersonates.

        @raise StatusError: 400 for impersonation headers without
            ``Impersonate-User``; 403 when C{user} may not impersonate.
        """
        names = headers.getRawHeaders(_USER, [])
        groups = [g.decode("utf-8") for g in headers.getRawHeaders(_GROUP, [])]
        uids = headers.getRawHeaders(_UID, [])
        extra = _extraHeaders(headers)
        if not (names or groups or uids or extra):
            return user
        if len(names) != 1:
            raise badRequest(
                "requested impersonation of groups, uid or extra without "
                "impersonating exactly one user (Impersonate-User)"
            )
        target = names[0].decode("utf-8")
        if user.username not in self._impersonators:
            raise forbidden(
                f'users "{target}" is forbidden: User "{user.username}" cannot '
                'impersonate resource "users" in API group "" at the cluster scope',
                name=target,
                kind="users",
            )
        uid = uids[0].decode("utf-8") if uids else ""
        return _withAuthenticated(target, groups, uid, extra)

    def mayAct(self, user):
        """Whether C{user} may do more than discovery and asking who it is."""
        return user.username not in self._denied

    def authorize(self, user, verb, resource, namespace="", name="", group=""):
        """Refuse C{user} with the 403 RBAC would give when it may not act.

        @raise StatusError: 403 naming the verb, resource and scope.
        """
        if not self.mayAct(user):
            raise _refusal(user, verb, resource, namespace, name, group)


    def authorizeReviewer(self, user):
        """Refuse C{user} a ``SubjectAccessReview`` unless it is an
        impersonator or in ``system:masters``.

        @raise StatusError: 403 as RBAC words it.
        """
        if user.username not in self._impersonators and MASTERS not in user.groups:
            raise _refusal(user, "create", "subjectaccessreviews", group="authorization.k8s.io")

    def reviewImpersonation(self, spec):
        """Answer a ``SubjectAccessReview`` C{spec}: may its user impersonate?

        @return: C{(allowed, reason)}.
        """
        user = spec.get("user", "")
        attributes = spec.get("resourceAttributes") or {}
        target = impersonationTarget(attributes)
        if target is None:
            return False, (
                "the API server emulator answers only verb=impersonate questions about "
                "users, groups, serviceaccounts, uids and userextras"
            )
        for rule in self._rules:
            if rule.allows(user, target):
                return True, f"allowed by --allow-impersonate {rule}"
        return False, (
            f'no --allow-impersonate rule lets "{user}" impersonate '
            f'{attributes.get("resource")} "{attributes.get("name", "")}"'
        )


def _refusal(user, verb, resource, namespace="", name="", group=""):
    """The 403 RBAC gives C{user} for C{verb} on C{resource}."""
    qualified = f"{resource}.{group}" if group else resource
    subject = f'{qualified} "{name}"' if name else qualified
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return forbidden(
        f'{subject} is forbidden: User "{user.username}" cannot {verb} '
        f'resource "{resource}" in API group "{group}" {scope}',
        name=name,
        kind=resource,
        group=group,
    )


def _withAuthenticated(username, groups, uid="", extra=None):
    """A L{UserInfo} carrying ``system:authenticated`` like every real caller."""
    groups = tuple(groups)
    if AUTHENTICATED not in groups:
        groups += (AUTHENTICATED,)
    return UserInfo(username, groups, uid, extra or {})


def _extraHeaders(headers):
    """``Impersonate-Extra-<key>`` values keyed by unescaped, lower-case key."""
    extra = {}
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower.startswith(_EXTRA):
            key = unquote(lower[len(_EXTRA) :].decode("latin-1"))
            extra.setdefault(key, []).extend(v.decode("utf-8") for v in values)
    return {key: tuple(values) for key, values in extra.items()}

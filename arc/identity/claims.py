"""From the claims of a verified token to a :class:`Principal` (no I/O).

Time checks take ``now`` as an argument so that tests (and callers with
their own clock) decide what time it is.
"""

from arc.identity.model import (
    EXTRA_ISSUER,
    EXTRA_SUBJECT,
    OIDC,
    AuthError,
    Principal,
    shorten,
)

RESERVED = "system:"


def _number(claims, name):
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError("bad_claim", "the token's %r claim is not a number of seconds since "
                                     "1970; the identity provider issued a broken token" % (name,))
    return value


def _ago(seconds):
    seconds = int(abs(seconds))
    if seconds < 120:
        return "%d s" % (seconds,)
    if seconds < 7200:
        return "%d min" % (seconds // 60,)
    return "%d h" % (seconds // 3600,)


def check_times(claims, now, leeway):
    """Refuse expired tokens and tokens from the future (``leeway`` seconds of skew)."""
    exp = _number(claims, "exp")
    iat = _number(claims, "iat")
    nbf = _number(claims, "nbf")
    if exp is None or iat is None:
        missing = "exp" if exp is None else "iat"
        raise AuthError("missing_claim", "the token has no %r claim; arc accepts only tokens "
                                         "that say when they were issued and when they expire"
                        % (missing,))
    if exp <= now - leeway:
        raise AuthError("expired", "the token expired %s ago; get a new one (run `arc login`)"
                        % (_ago(now - exp),))
    if iat > now + leeway:
        raise AuthError("not_yet_valid", "the token was issued %s in the future; the clock of "
                                         "this machine or of the identity provider is wrong "
                                         "(check NTP on both)" % (_ago(iat - now),))
    if nbf is not None and nbf > now + leeway:
        raise AuthError("not_yet_valid", "the token is not valid for another %s (nbf); wait, or "
                                         "check the clocks of this machine and the identity "
                                         "provider" % (_ago(nbf - now),))


def _strings(claims, name, what):
    value = claims.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AuthError("bad_claim", "the token's %r claim (%s) is neither a string nor a list of "
                                 "strings; check the identity provider's claim mapping"
                    % (name, what))


def check_overage(claims, groups_claim):
    """Refuse tokens whose groups did not fit (Microsoft Entra "groups overage")."""
    names = claims.get("_claim_names")
    overflow = (
        (isinstance(names, dict) and (groups_claim in names or "groups" in names))
        or claims.get("hasgroups") is True
        or ("_claim_sources" in claims and groups_claim not in claims)
    )
    if overflow:
        raise AuthError("overage", "the user is in too many groups for the token to list them "
                                   "(the identity provider sent a reference instead of the "
                                   "groups claim); in the identity provider, emit only the "
                                   "groups assigned to the application (group filtering) or "
                                   "use app roles, then get a new token")


def _username(claims, settings):
    name = settings.username_claim
    if name == "email" and claims.get("email_verified") is not True:
        raise AuthError("unverified_email", "the token's email address is not verified "
                                            "(email_verified is not true), so it cannot name "
                                            "the user; verify the address in the identity "
                                            "provider, or use another username_claim")
    value = claims.get(name)
    if value is None:
        raise AuthError("missing_claim", "the token has no %r claim to take the user name "
                                         "from; have the identity provider include it, or set "
                                         "username_claim" % (name,))
    if not isinstance(value, str) or not value:
        raise AuthError("bad_claim", "the token's %r claim is not a non-empty string, so it "
                                     "cannot name the user" % (name,))
    return settings.username_prefix + value


def principal_from_claims(claims, settings):
    """The :class:`Principal` named by verified ``claims`` under ``settings``."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthError("missing_claim", "the token has no usable 'sub' claim")
    check_overage(claims, settings.groups_claim)
    username = _username(claims, settings)
    groups = []
    for group in _strings(claims, settings.groups_claim, "groups"):
        group = settings.groups_prefix + group
        if group not in groups:
            groups.append(group)
    for name in [username] + groups:
        if name.startswith(RESERVED):
            raise AuthError("forbidden_identity", "the token names %s, a reserved Kubernetes "
                                                  "identity that arc never impersonates; remove "
                                                  "it in the identity provider or set a "
                                                  "username_prefix / groups_prefix"
                            % (shorten(name),))
    extra = {EXTRA_ISSUER: (claims["iss"],), EXTRA_SUBJECT: (subject,)}
    for claim, key in settings.extra_claims:
        values = _strings(claims, claim, "extra_claims")
        if values:
            extra[key] = values
    return Principal(username=username, groups=tuple(groups), extra=extra,
                     issuer=claims["iss"], subject=subject, method=OIDC)

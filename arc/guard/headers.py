"""Identity header hygiene: what a client may send, and what the guard sets.

Every rule here exists because the API server trusts these headers from the
guard's own identity: a client must never be able to smuggle one through.

- ``Impersonate-*`` from a client (any case): refused with 403, unless the
  guard allows client impersonation (then checked by the caller).
- ``Connection`` naming a protected header: refused with 400 (a hop-by-hop
  declaration would make the next hop drop the guard's own headers).
- removed: ``Authorization`` (kept aside for authentication),
  ``Proxy-Authorization``, ``X-Remote-*``, ``X-Forwarded-*`` (untrusted),
  ``Audit-ID`` and bearer entries of ``Sec-WebSocket-Protocol``.
- set: ``Impersonate-User``, one ``Impersonate-Group`` per group,
  ``Impersonate-Extra-<key>`` (lower-case, percent-encoded key) per value,
  and a fresh ``Audit-ID``.
"""

import base64
import binascii
import re
from urllib.parse import quote

from arc.guard.http1 import HTTPError

WS_BEARER_PREFIX = "base64url.bearer.authorization.k8s.io."
_PROTECTED_PREFIXES = ("impersonate-", "x-remote-", "x-forwarded-")
_PROTECTED = ("authorization", "proxy-authorization", "audit-id")


def _protected(name):
    return name in _PROTECTED or name.startswith(_PROTECTED_PREFIXES)


class Cleaned:
    """The outcome of :func:`clean` and :func:`clean_head`.

    ``headers`` is the list of headers kept (``[name, value]``); a head
    cleaned by :func:`clean_head` may instead carry them as ``text``, the
    header lines as sent on (each preceded by CRLF).  :meth:`header_text`
    gives that text either way.
    """

    __slots__ = ("headers", "bearer", "impersonation", "upgrade", "text")

    def __init__(self, headers, bearer, impersonation, upgrade, text=None):
        self.headers = headers
        self.bearer = bearer
        self.impersonation = impersonation  # list of (name, value) the client sent
        self.upgrade = upgrade              # "websocket", "spdy", other or ""
        self.text = text

    def header_text(self):
        if self.text is None:
            self.text = header_lines(self.headers)
        return self.text


def header_lines(headers):
    """``[[name, value], ...]`` as header lines, each preceded by CRLF."""
    return "".join(["\r\n%s: %s" % (name, value) for name, value in headers])


def _bearer(value):
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise HTTPError(401, "the Authorization header must be a bearer token "
                             "(\"Authorization: Bearer TOKEN\")")
    token = token.strip()
    if not token or " " in token:
        raise HTTPError(401, "malformed bearer token in the Authorization header")
    return token


def _ws_bearer(entry):
    encoded = entry[len(WS_BEARER_PREFIX):]
    try:
        token = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise HTTPError(401, "malformed bearer token in Sec-WebSocket-Protocol")
    if not token:
        raise HTTPError(401, "empty bearer token in Sec-WebSocket-Protocol")
    return token


def clean(headers, allow_impersonation=False):
    """Check and strip a request's headers (``[[name, value], ...]``)."""
    out = []
    bearer = None
    ws_bearer = None
    impersonation = []
    upgrade = ""
    for name, value in headers:
        lower = name.lower()
        if lower == "connection":
            for token in value.split(","):
                token = token.strip().lower()
                if _protected(token):
                    raise HTTPError(400, "the Connection header may not name %r: that would "
                                         "strip an identity header" % (token,))
            out.append([name, value])
        elif lower.startswith("impersonate-"):
            if not allow_impersonation:
                raise HTTPError(403, "impersonation (kubectl --as/--as-group, header %s) is "
                                     "not allowed through this guard" % (name,))
            impersonation.append((lower, value))
        elif lower == "authorization":
            if bearer is not None:
                raise HTTPError(400, "more than one Authorization header")
            bearer = _bearer(value)
        elif lower == "sec-websocket-protocol":
            kept = []
            for entry in value.split(","):
                entry = entry.strip()
                if entry.startswith(WS_BEARER_PREFIX):
                    if ws_bearer is not None:
                        raise HTTPError(400, "more than one bearer token in "
                                             "Sec-WebSocket-Protocol")
                    ws_bearer = _ws_bearer(entry)
                elif entry:
                    kept.append(entry)
            if kept:
                out.append([name, ", ".join(kept)])
        elif _protected(lower):
            continue
        else:
            if lower == "upgrade":
                v = value.lower()
                upgrade = "websocket" if "websocket" in v else "spdy" if "spdy" in v else v
            out.append([name, value])
    if bearer is not None and ws_bearer is not None:
        raise HTTPError(400, "bearer token given both in Authorization and in "
                             "Sec-WebSocket-Protocol")
    return Cleaned(out, bearer if bearer is not None else ws_bearer, impersonation, upgrade)


# In a canonical head (arc.guard.http1.Head) every header line this module
# acts on starts with one of these (lower-cased).
_SPECIAL = re.compile(r"\r\n(?:(?:authorization|connection|upgrade|sec-websocket-protocol|"
                      r"proxy-authorization|audit-id): |impersonate-|x-remote-|x-forwarded-)")
_AUTHORIZATION = "\r\nauthorization: "


def clean_head(head, allow_impersonation=False):
    """:func:`clean` for a parsed :class:`~arc.guard.http1.Head`.

    A canonical head whose only identity header is one ``Authorization``
    (what kubectl sends) is cleaned by cutting that line out of its text;
    any other head goes through :func:`clean`, with the same outcome.
    """
    lower = head.lower
    if lower is not None:
        start = lower.find(_AUTHORIZATION)
        if start >= 0:
            end = lower.find("\r\n", start + 2)
            if end < 0:
                end = len(lower)
            # No other line to act on (a second Authorization included).
            if _SPECIAL.search(lower[:start] + lower[end:]) is None:
                text = head.text
                return Cleaned(None, _bearer(text[start + len(_AUTHORIZATION):end]), [], "",
                               text[:start] + text[end:])
    return clean(head.headers, allow_impersonation)


def impersonation_headers(username, groups, extra):
    """The headers that make the API server act as the caller."""
    out = [["Impersonate-User", username]]
    out.extend(["Impersonate-Group", g] for g in groups)
    for key in sorted(extra):
        encoded = quote(key.lower(), safe="")
        for value in extra[key]:
            out.append(["Impersonate-Extra-" + encoded, _header_value(value)])
    return out


def _header_value(value):
    """Printable ASCII as it is; anything else percent-encoded (UTF-8)."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe="")


_IDENTITY_LINES = {}
_IDENTITY_LINES_SIZE = 1024


def identity_lines(principal):
    """:func:`impersonation_headers` of ``principal`` as header lines (see :func:`header_lines`).

    Remembered per principal object: the authenticator hands out the same
    object for the same caller (static user, cached ID token).
    """
    entry = _IDENTITY_LINES.get(id(principal))
    # The entry holds the principal, so its id cannot be reused while it is here.
    if entry is not None and entry[0] is principal:
        return entry[1]
    text = header_lines(impersonation_headers(principal.username, principal.groups,
                                              principal.extra))
    if len(_IDENTITY_LINES) >= _IDENTITY_LINES_SIZE:
        _IDENTITY_LINES.clear()
    _IDENTITY_LINES[id(principal)] = (principal, text)
    return text


_last_credentials = (None, "")


def credential_lines(headers):
    """:func:`header_lines` of the guard's credential headers (the same for a while)."""
    global _last_credentials
    last, text = _last_credentials
    if headers != last:
        text = header_lines(headers)
        _last_credentials = (headers, text)
    return text

"""Kubernetes ``Status`` answers for kubectl, when arc itself must answer.

kubectl prints a Status's ``message``; each one names the cluster, the cause
and, where there is one, the fix.
"""

import json

from arc.tunnel import frames as F

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            502: "BadGateway", 503: "ServiceUnavailable", 504: "Timeout"}
_PHRASES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}

# Stream reset codes and the HTTP status kubectl gets for them.
RESET_STATUS = {
    F.UNAUTHORIZED: 401,
    F.FORBIDDEN: 403,
    F.UNKNOWN_CLUSTER: 403,
    F.CLUSTER_OFFLINE: 503,
    F.UPSTREAM_UNREACHABLE: 502,
    F.GOING_AWAY: 503,
    F.TUNNEL_LOST: 503,
    F.TIMEOUT: 504,
    F.LIMIT_EXCEEDED: 503,
}
RETRY_AFTER = 0


def status_body(code, message):
    return json.dumps({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": _REASONS.get(code, "InternalError"), "code": code,
    }).encode("utf-8")


def _warning_text(message):
    text = "".join(c if 0x20 <= ord(c) < 0x7f and c not in '"\\' else "'" if c == '"' else "?"
                   for c in message)
    return text[:500]


def status_response(code, message):
    """A complete HTTP/1.1 response carrying a Status; the connection closes."""
    body = status_body(code, message)
    lines = ["HTTP/1.1 %d %s" % (code, _PHRASES.get(code, "Error")),
             "Content-Type: application/json",
             "Content-Length: %d" % len(body),
             "Cache-Control: no-store",
             "Connection: close"]
    if code in (503, 504):
        lines.append("Retry-After: %d" % RETRY_AFTER)
    # kubectl prints Warning headers even where it shows a generic text for
    # the status (discovery requests): the cause always reaches the user.
    lines.append('Warning: 299 - "%s"' % _warning_text(message))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def for_reset(code, reason):
    """``(http status, message)`` for a stream reset before any answer."""
    return RESET_STATUS.get(code, 502), reason

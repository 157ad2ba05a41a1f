"""The guard's request metrics, taken from each finished audit record.

The guard hands every record it audits to :meth:`GuardMetrics.request`
(one call per request, when it ends): requests by decision and status
class, and authentication failures by their :class:`~arc.identity.model.AuthError`
code.
"""

from prometheus_client import CollectorRegistry, Counter

from arc.metrics import listener_readiness, status_class
from arc.ops.endpoint import metrics_service

#: How the guard words the reason of a refused token (arc.guard.proxy).
AUTH_REASON_PREFIX = "authentication: "
DECISIONS = frozenset(("allow", "deny", "error"))


class GuardMetrics:
    def __init__(self, registry):
        self.requests = Counter("arc_guard_requests", "requests the guard finished, by "
                                "decision (allow, deny, error) and HTTP status class",
                                ["decision", "status_class"], registry=registry)
        self.auth_failures = Counter("arc_guard_auth_failures", "requests refused for their "
                                     "credential, by reason (missing_token, bad_header, or "
                                     "the identity code: expired, bad_signature, ...)",
                                     ["reason"], registry=registry)
        # (decision, status) -> its labelled counter: labels() costs more than inc().
        self._requests = {}

    def request(self, record):
        """One finished request (an :class:`~arc.guard.audit.AuditRecord`)."""
        decision = record.decision if record.decision in DECISIONS else "other"
        key = (decision, record.status)
        child = self._requests.get(key)
        if child is None:
            child = self.requests.labels(decision, status_class(record.status))
            if type(record.status) is int and 100 <= record.status < 600:
                self._requests[key] = child     # at most 4 x 500 entries
        child.inc()
        if decision == "deny" and record.status == 401:
            reason = record.reason or ""
            if reason.startswith(AUTH_REASON_PREFIX):
                code = reason[len(AUTH_REASON_PREFIX):].strip() or "unknown"
            elif reason.startswith("no bearer token"):
                code = "missing_token"
            else:
                code = "bad_header"   # a malformed Authorization or WebSocket credential
            self.auth_failures.labels(code).inc()


def guard_metrics(settings, reactor, guard, listener, *, file=None):
    """The metrics listener of a standalone guard (``arc-guard``)."""
    registry = CollectorRegistry()
    guard.metrics = GuardMetrics(registry)
    return metrics_service(reactor, settings, registry, listener_readiness(listener, "guard"),
                           file=file)

"""Prometheus metrics, liveness and readiness on one small plain-HTTP listener.

Every part (relay, agent, client daemon, standalone guard) takes the same
optional section::

    metrics:
      listen: "tcp:9090:interface=127.0.0.1"   # the default

and then serves, on that endpoint only:

- ``/metrics``: the part's metrics in the Prometheus text format, from a
  registry of its own (a :class:`prometheus_client.CollectorRegistry` per
  service, so parts sharing a process never clash);
- ``/healthz``: 200 while the process runs (liveness);
- ``/readyz``: 200 when the part can do its work, else 503 with a JSON
  ``reason`` (the agent and the client: their tunnel to the relay is up;
  the relay and the guard: they listen).

The listener speaks plain HTTP; keep it on loopback or on a network only the
scraper reaches.  Nothing it serves names a token.

This module holds the settings and what the parts share, and stays light to
import (configuration loaders use it); the listener itself is
:mod:`arc.ops.endpoint`.
"""

from dataclasses import dataclass

from arc.tunnel import frames as F

DEFAULT_LISTEN = "tcp:9090:interface=127.0.0.1"


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = DEFAULT_LISTEN


def parse_metrics(node):
    """The optional ``metrics:`` section of ``node``; None when it is absent."""
    if not node.has("metrics"):
        node.section("metrics")
        return None
    section = node.section("metrics")
    listen = section.get("listen", str, DEFAULT_LISTEN)
    if listen.startswith("ssl:"):
        raise section.error("listen", "the metrics listener serves plain HTTP: give a tcp: (or "
                                      "unix:) endpoint, on loopback unless only the scraper "
                                      "can reach it")
    section.finish()
    return MetricsSettings(listen)


def code_name(code):
    """A bounded label for a reset code: its name, or UNKNOWN (peers send any integer)."""
    return F.ERROR_NAMES.get(code, "UNKNOWN")


def status_class(status):
    """``2xx``, ``4xx``, ...; ``other`` for anything outside 100-599."""
    return "%dxx" % (status // 100) if 100 <= status < 600 else "other"


def tunnel_readiness(dialer):
    """``ready()`` for a part whose work needs its tunnel: None when up, else the reason."""

    def ready():
        session = dialer.session
        if session is not None and not session.closed:
            if session.can_open():
                return None
            return "the tunnel to the relay %s is draining (GOAWAY); a new one follows" % (
                dialer.relay_url,)
        return "the tunnel to the relay %s is down: %s" % (
            dialer.relay_url, dialer.last_error or "connecting")

    return ready


def listener_readiness(listener, what):
    """``ready()`` for a part whose work is to listen: None once its port is bound."""
    from arc.service import bound_port

    bound = []

    def ready():
        if not listener.running:
            return "the %s is stopping" % (what,)
        if not bound and getattr(listener, "_waitingForPort", None) is not None:
            bound_port(listener).addCallbacks(bound.append, lambda failure: None)
        if not bound:
            return "the %s does not listen yet" % (what,)
        return None

    return ready

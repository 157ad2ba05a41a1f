"""The metrics listener: ``/metrics``, ``/healthz`` and ``/readyz`` (see :mod:`arc.metrics`)."""

import json

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.web.resource import Resource
from twisted.web.server import Site

from arc.service import listen_service


class DialerCollector:
    """Tunnel state of a :class:`~arc.tunnel.dial.TunnelDialer`, read at scrape time.

    ``PREFIX_tunnel_up`` (0/1), ``PREFIX_tunnel_connects_total`` (successful
    upgrades, the first one included: more than one means reconnections) and
    ``PREFIX_tunnel_rtt_seconds`` (the last keepalive round trip).  For an
    agent holding a tunnel to each relay replica, also
    ``PREFIX_replica_tunnels_up``.
    """

    def __init__(self, prefix, dialer):
        self.prefix = prefix
        self.dialer = dialer

    def describe(self):
        return []

    def collect(self):
        p = self.prefix
        session = self.dialer.session
        up = session is not None and not session.closed
        yield GaugeMetricFamily(p + "tunnel_up", "1 while the tunnel to the relay is up",
                                value=1 if up else 0)
        yield CounterMetricFamily(p + "tunnel_connects", "tunnels established to the relay "
                                  "(the first included)", value=self.dialer.connects)
        rtt = GaugeMetricFamily(p + "tunnel_rtt_seconds", "round trip of the last keepalive "
                                "ping answered on the tunnel")
        if up and session.rtt is not None:
            rtt.add_metric([], session.rtt)
        yield rtt
        replicas = getattr(self.dialer, "tunnels_up", None)
        if replicas is not None:
            # An agent dialing every relay replica (arc.tunnel.replicas).
            yield GaugeMetricFamily(p + "replica_tunnels_up", "tunnels up, one per relay "
                                    "replica", value=replicas)


def _json(request, code, obj):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(obj).encode() + b"\n"


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request):
        return _json(request, 200, {"status": "alive"})


class _Ready(Resource):
    isLeaf = True

    def __init__(self, ready):
        super().__init__()
        self.ready = ready

    def render_GET(self, request):
        reason = self.ready()
        if reason is None:
            return _json(request, 200, {"status": "ready"})
        return _json(request, 503, {"status": "not ready", "reason": reason})


class _QuietSite(Site):
    """No access log line per scrape."""

    noisy = False
    displayTracebacks = False

    def log(self, request):
        pass


def metrics_site(registry, ready):
    root = Resource()
    root.putChild(b"metrics", _Metrics(registry))
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(ready))
    return _QuietSite(root)


def metrics_service(reactor, settings, registry, ready, *, file=None):
    """The listener service for ``settings`` (a :class:`MetricsSettings`)."""
    return listen_service(reactor, settings.listen, metrics_site(registry, ready), None,
                          file=file, key="metrics.listen")

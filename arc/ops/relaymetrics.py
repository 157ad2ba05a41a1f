"""The relay's Prometheus metrics, read from its :class:`~arc.ops.relaywatch.RelayWatch`.

Every value is taken when scraped: live ones (tunnels, streams open,
keepalive round trips) from the relay's tables, counted ones from the
watch's counters, which move at connection and stream boundaries.  Labels
are bounded: clusters come from the registry (or an accepted agent), reset
codes from the protocol's list, refusal reasons from a fixed vocabulary.
"""

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from arc.metrics import listener_readiness
from arc.ops.endpoint import metrics_service


class RelayCollector:
    def __init__(self, watch):
        self.watch = watch

    def describe(self):
        return []

    def collect(self):
        watch = self.watch
        relay = watch.relay
        clusters = sorted(set(relay.registry.clusters) | set(relay.agents))
        tunnels = GaugeMetricFamily("arc_relay_agent_tunnels", "agent tunnels up, per cluster",
                                    labels=["cluster"])
        streams = GaugeMetricFamily("arc_relay_streams_open", "streams open now, per cluster",
                                    labels=["cluster"])
        rtt = GaugeMetricFamily("arc_relay_agent_rtt_seconds", "round trip of the last "
                                "keepalive ping answered, per cluster (the slowest of its "
                                "agent tunnels)", labels=["cluster"])
        open_by_cluster = {}
        for info in watch.streams.values():
            open_by_cluster[info.cluster] = open_by_cluster.get(info.cluster, 0) + 1
        for cluster in clusters:
            sessions = relay.agents.get(cluster, ())
            tunnels.add_metric([cluster], len(sessions))
            streams.add_metric([cluster], open_by_cluster.get(cluster, 0))
            rtts = [s.rtt for s in sessions if s.rtt is not None]
            if rtts:
                rtt.add_metric([cluster], max(rtts))
        yield tunnels
        yield streams
        yield rtt
        yield GaugeMetricFamily("arc_relay_client_tunnels", "client tunnels up",
                                value=len(relay.clients))
        opened = CounterMetricFamily("arc_relay_streams_opened", "streams opened, per cluster",
                                     labels=["cluster"])
        for cluster, n in sorted(watch.opened.items()):
            opened.add_metric([cluster], n)
        yield opened
        failed = CounterMetricFamily("arc_relay_streams_failed", "streams refused or reset, "
                                     "by reset code (CANCELLED, a closed kubectl connection, "
                                     "is not counted)", labels=["code"])
        for code, n in sorted(watch.failed.items()):
            failed.add_metric([code], n)
        yield failed
        sent = CounterMetricFamily("arc_relay_stream_bytes", "payload bytes of ended streams, "
                                   "per cluster and direction", labels=["cluster", "direction"])
        for (cluster, direction), n in sorted(watch.bytes.items()):
            sent.add_metric([cluster, direction], n)
        yield sent
        auth = CounterMetricFamily("arc_relay_auth_failures", "tunnel upgrades refused for "
                                   "their credential, by tunnel (agent, client) and reason",
                                   labels=["tunnel", "reason"])
        for (tunnel, reason), n in sorted(watch.auth_failures.items()):
            auth.add_metric([tunnel, reason], n)
        yield auth
        connects = CounterMetricFamily("arc_relay_agent_connects", "agent tunnels accepted, "
                                       "per cluster (more than one: the agent reconnected)",
                                       labels=["cluster"])
        for cluster, n in sorted(watch.agent_connects.items()):
            connects.add_metric([cluster], n)
        yield connects
        yield CounterMetricFamily("arc_relay_client_connects", "client tunnels accepted",
                                  value=watch.client_connects)


def relay_metrics(settings, reactor, watch, listener, *, file=None):
    """The metrics listener of a relay (``settings`` from its ``metrics:`` section)."""
    registry = CollectorRegistry()
    registry.register(RelayCollector(watch))
    return metrics_service(reactor, settings, registry, listener_readiness(listener, "relay"),
                           file=file)

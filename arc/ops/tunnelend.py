"""Metrics of a tunnel end: the agent, or the client daemon.

:class:`StreamMetrics` is told of each stream once, when it starts
(:meth:`StreamMetrics.watch`), and becomes the stream's observer: the
stream tells it of its first ACK and of its end.  So counters move at
stream boundaries only, never per frame.  The tunnel itself (up, connects,
keepalive round trip) is read from the dialer at scrape time
(:class:`arc.ops.endpoint.DialerCollector`).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from arc.metrics import code_name, tunnel_readiness
from arc.ops.endpoint import DialerCollector, metrics_service
from arc.ops.guardmetrics import GuardMetrics
from arc.tunnel import frames as F
from arc.tunnel.stream import StreamReset

#: Resets that end a stream normally: kubectl closed its connection.
NOT_FAILURES = frozenset((F.NORMAL, F.CANCELLED))
OPEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)


class StreamMetrics:
    """Stream counters of one part (``part`` is ``agent`` or ``client``).

    :param clock: ``seconds()``, for the open latency (client side: from the
        stream open to the far end's ACK).
    """

    def __init__(self, registry, part, clock):
        self.clock = clock
        p = "arc_%s_" % (part,)
        self.opened = Counter(p + "streams_opened", "streams opened on the tunnel",
                              registry=registry)
        self.open = Gauge(p + "streams_open", "streams open now", registry=registry)
        self.failed = Counter(p + "streams_failed", "streams ended by a reset, by its code "
                              "(CANCELLED, a closed kubectl connection, is not counted)",
                              ["code"], registry=registry)
        self.bytes = Counter(p + "stream_bytes", "payload bytes of ended streams: received "
                             "from or sent into the tunnel", ["direction"], registry=registry)
        self.latency = None
        if part == "client":
            self.latency = Histogram(p + "stream_open_seconds", "from a stream open to the "
                                     "agent's acknowledgement", buckets=OPEN_BUCKETS,
                                     registry=registry)
        self._opening = {}

    def watch(self, stream):
        """Count ``stream`` (just opened or accepted) and observe it until it ends."""
        stream.observer = self
        self.opened.inc()
        self.open.inc()
        if self.latency is not None and not stream.acked:
            self._opening[stream] = self.clock.seconds()

    # -- the stream's observer callbacks ---------------------------------------------

    def stream_acked(self, stream):
        started = self._opening.pop(stream, None)
        if started is not None:
            self.latency.observe(max(0.0, self.clock.seconds() - started))

    def stream_ended(self, stream, reason):
        self._opening.pop(stream, None)
        self.open.dec()
        self.bytes.labels("received").inc(stream.bytes_in)
        self.bytes.labels("sent").inc(stream.bytes_out)
        if isinstance(reason, StreamReset) and reason.code not in NOT_FAILURES:
            self.failed.labels(code_name(reason.code)).inc()


def tunnel_end_metrics(part, settings, reactor, dialer, *, guard=None, file=None):
    """``(service, stream_metrics)`` of an agent or client with a ``metrics:`` section.

    ``guard`` (the agent's in-process guard, if any) has its requests counted
    in the same registry.
    """
    registry = CollectorRegistry()
    streams = StreamMetrics(registry, part, reactor)
    registry.register(DialerCollector("arc_%s_" % (part,), dialer))
    if guard is not None:
        guard.metrics = GuardMetrics(registry)
    service = metrics_service(reactor, settings, registry, tunnel_readiness(dialer), file=file)
    return service, streams

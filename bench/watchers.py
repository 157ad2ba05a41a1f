"""The watch workload's load generator: many concurrent watches over TLS, one process.

Opens COUNT TLS connections to HOST:PORT (at most CONCURRENCY of them still waiting for
their answer head at any time), sends each one

    GET /api/v1/namespaces/default/pods?watch=true

as kubectl does (HTTP/1.1, bearer token, server name SERVER_NAME when given), and
waits for every answer head (200, chunked).  Then it prints one JSON line

    {"phase": "opened", "opened": N, "failed": F, "seconds": S, ...}

and holds every watch open.  On the line ``wait SECONDS`` on stdin (sent just before the
backend is told to send its events) it waits until each open watch has received one
event, at most SECONDS, and prints

    {"phase": "events", "received": R, "expected": N, "latency_ms": {"p50": ..}, ...}

where a latency is the time from the backend stamping the event (``sent_ns``, its
``time.monotonic_ns()``, a clock shared by every process of the machine) to this process
reading it.  Then it exits, which closes every connection.  Everything it could not do
within its time bounds is counted, never waited for.

    python bench/watchers.py --host 127.0.0.1 --port P --count N [--server-name NAME]
                             [--token T] [--concurrency C] [--open-timeout S]
"""

import argparse
import json
import math
import os
import re
import resource
import sys
import time

from OpenSSL import SSL
from twisted.internet import reactor, stdio
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

WATCH_PATH = "/api/v1/namespaces/default/pods?watch=true"
STAMP = re.compile(rb'"sent_ns":(\d+)[,}]')
MAX_BUF = 65536


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """TLS without certificate checks (everything is on loopback), with SNI when named."""

    def __init__(self, server_name):
        self.ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        self.server_name = server_name.encode("ascii") if server_name else None

    def clientConnectionForTLS(self, tlsProtocol):
        conn = SSL.Connection(self.ctx, None)
        conn.set_app_data(tlsProtocol)
        if self.server_name:
            conn.set_tlsext_host_name(self.server_name)
        conn.set_connect_state()
        return conn


def percentile(values, pct):
    """Nearest-rank percentile of sorted ``values``."""
    return values[max(0, min(len(values) - 1, math.ceil(pct / 100.0 * len(values)) - 1))]


class Watcher(Protocol):
    def __init__(self, run):
        self.run = run
        self.buf = b""
        self.state = "connecting"   # -> head -> open -> done (event received)

    def connectionMade(self):
        self.state = "head"
        self.transport.write(self.run.request)

    def dataReceived(self, data):
        now = time.monotonic_ns()
        if len(self.buf) < MAX_BUF:
            self.buf += data
        if self.state == "head":
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.buf[:end].split(b"\r\n", 1)[0]
            if not status.startswith(b"HTTP/1.1 200 "):
                self.run.open_failed(self, "answer %r" % status[:80].decode("latin-1"))
                self.state = "failed"
                self.transport.abortConnection()
                return
            self.buf = self.buf[end + 4:]
            self.state = "open"
            self.run.open_done(self)
        if self.state == "open":
            m = STAMP.search(self.buf)
            if m:
                self.state = "done"
                self.buf = b""
                self.run.event(now - int(m.group(1)))

    def connectionLost(self, reason):
        msg = reason.getErrorMessage()
        if self.state in ("connecting", "head"):
            self.run.open_failed(self, "connection lost before the answer head: " + msg)
        elif self.state == "open":
            self.run.lost(msg)
        self.state = "closed"


class Run:
    def __init__(self, opts):
        self.opts = opts
        host = opts.server_name or opts.host
        self.request = ("GET %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                        "Accept: application/json\r\nUser-Agent: arc-bench-watchers\r\n\r\n"
                        % (WATCH_PATH, host, opts.token)).encode()
        self.endpoint = wrapClientTLS(ClientTLS(opts.server_name),
                                      TCP4ClientEndpoint(reactor, opts.host, opts.port,
                                                         timeout=opts.connect_timeout))
        self.factory = Factory.forProtocol(lambda: Watcher(self))
        self.started = 0
        self.inflight = 0
        self.opened = 0
        self.failed = 0
        self.lost_open = 0           # open watches whose connection ended before their event
        self.lost_after_opened = 0   # of them, those lost after the "opened" report
        self.errors = {}
        self.latencies = []
        self.t0 = time.monotonic()
        self.open_reported = False
        self.waiting = None          # deadline of the event phase
        self.event_first = self.event_last = None
        self.scheduled = False

    def error(self, msg):
        self.errors[msg] = self.errors.get(msg, 0) + 1

    # -- opening
    def fill(self):
        self.scheduled = False
        if self.open_reported:
            return
        while self.inflight < self.opts.concurrency and self.started < self.opts.count:
            self.started += 1
            self.inflight += 1
            d = self.endpoint.connect(self.factory)
            d.addErrback(self.connect_failed)
        self.check_opened()

    def schedule_fill(self):
        if not self.scheduled:
            self.scheduled = True
            reactor.callLater(0, self.fill)

    def connect_failed(self, failure):
        self.inflight -= 1
        self.failed += 1
        self.error("connect: " + failure.getErrorMessage())
        self.schedule_fill()

    def open_done(self, watcher):
        self.inflight -= 1
        self.opened += 1
        self.schedule_fill()

    def open_failed(self, watcher, msg):
        if watcher.state in ("connecting", "head"):
            self.inflight -= 1
            self.failed += 1
            self.error(msg)
            self.schedule_fill()

    def check_opened(self):
        if not self.open_reported and self.opened + self.failed >= self.opts.count:
            self.report_opened()

    def open_deadline(self):
        if not self.open_reported:
            self.error("open timeout: %d watches had no answer head after %.0f s"
                       % (self.opts.count - self.opened - self.failed, self.opts.open_timeout))
            self.report_opened()

    def report_opened(self):
        self.open_reported = True
        emit({"phase": "opened", "count": self.opts.count, "opened": self.opened,
              "failed": self.failed, "not_answered": self.opts.count - self.opened - self.failed,
              "lost": self.lost_open, "seconds": round(time.monotonic() - self.t0, 3),
              "errors": self.top_errors()})

    # -- events
    def lost(self, msg):
        self.lost_open += 1
        if self.open_reported:
            self.lost_after_opened += 1
        self.error("watch lost before its event: " + msg)
        self.check_events()

    def event(self, latency_ns):
        t = time.monotonic()
        if self.event_first is None:
            self.event_first = t
        self.event_last = t
        self.latencies.append(latency_ns / 1e6)
        self.check_events()

    def wait_events(self, seconds):
        self.waiting = time.monotonic() + seconds
        reactor.callLater(seconds, self.report_events)
        self.check_events()

    def check_events(self):
        if self.waiting is not None and len(self.latencies) + self.lost_open >= self.opened:
            self.report_events()

    def report_events(self):
        if self.waiting is None:
            return
        self.waiting = None
        lat = sorted(self.latencies)
        res = {"phase": "events", "expected": self.opened, "received": len(lat),
               "lost": self.lost_open, "lost_after_opened": self.lost_after_opened,
               "spread_s": (round(self.event_last - self.event_first, 3)
                            if self.event_first is not None else None),
               "errors": self.top_errors()}
        if lat:
            res["latency_ms"] = {"p50": percentile(lat, 50), "p90": percentile(lat, 90),
                                 "p99": percentile(lat, 99), "max": lat[-1],
                                 "min": lat[0], "mean": sum(lat) / len(lat)}
        emit(res)
        reactor.stop()

    def top_errors(self):
        return ["%d× %s" % (n, msg) for msg, n in
                sorted(self.errors.items(), key=lambda kv: -kv[1])[:5]]


class Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(self, run):
        self.run = run

    def lineReceived(self, line):
        words = line.decode("ascii", "replace").split()
        if words[:1] == ["wait"] and len(words) == 2:
            self.run.wait_events(float(words[1]))
        elif words[:1] == ["quit"]:
            reactor.stop()

    def connectionLost(self, reason):
        if reactor.running:  # the benchmark went away
            reactor.stop()


def emit(doc):
    """One JSON line on stdout (blocking: StandardIO below reads stdin only)."""
    data = (json.dumps(doc) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server-name", help="TLS server name and Host header (default: none)")
    p.add_argument("--token", default="bench-token")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=100,
                   help="watches at most waiting for their answer head at once")
    p.add_argument("--open-timeout", type=float, default=120.0)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    opts = p.parse_args(argv)
    if not opts.host.startswith("127."):
        p.error("the benchmark sends traffic to 127.0.0.0/8 only")
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < opts.count + 64:
        emit({"phase": "opened", "count": opts.count, "opened": 0, "failed": opts.count,
              "not_answered": 0, "lost": 0, "seconds": 0,
              "errors": ["the descriptor limit (%d) is below %d watches" % (soft, opts.count)]})
        return 1
    run = Run(opts)
    # Commands come on stdin; results go out through emit(), not through this transport.
    stdio.StandardIO(Commands(run), stdout=os.open(os.devnull, os.O_WRONLY))
    reactor.callWhenRunning(run.fill)
    reactor.callLater(opts.open_timeout, run.open_deadline)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The agent: serves each stream the relay opens by dialing kube-apiserver."""

import json

from twisted.logger import Logger

from arc.guard.proxy import QuietFactory
from arc.guard.upstream import PASSTHROUGH
from arc.tunnel import frames as F
from arc.tunnel.pipe import SocketSide, StreamPipe
from arc.tunnel.session import Session
from arc.tunnel.stream import Stream


class Agent:
    log = Logger()
    # Told ``watch(stream)`` of every stream accepted (arc.ops.tunnelend); None: nobody.
    stream_observer = None

    def __init__(self, reactor, cluster, upstream, limits, guard=None):
        self.reactor = reactor
        self.cluster = cluster
        self.upstream = upstream
        self.guard = guard
        self.limits = limits
        self.sessions = set()
        self.streams_total = 0

    def make_session(self):
        session = Session(dialer=True, clock=self.reactor, limits=self.limits,
                          name="relay", on_open=self._open, on_close=self._closed)
        self.sessions.add(session)
        return session

    def _closed(self, session, code, reason):
        self.sessions.discard(session)
        self.log.info("tunnel to relay closed: {reason}", reason=reason)

    @property
    def up(self):
        return any(not s.closed for s in self.sessions)

    def _open(self, session, sid, metadata):
        try:
            meta = json.loads(metadata) if metadata else {}
        except ValueError:
            meta = {}
        stream = Stream(session, metadata)
        stream.accept(sid)
        self.streams_total += 1
        if self.stream_observer is not None:
            self.stream_observer.watch(stream)
        if self.guard is not None:
            # The guard reads and writes the stream directly: no loopback hop.
            stream.attach(self.guard.protocol(peer="relay user %s" % (meta.get("user"),)))
            return stream
        pipe = StreamPipe()
        stream.attach(pipe)
        d = self.upstream.connect(PASSTHROUGH, QuietFactory(lambda: SocketSide(pipe)))

        def failed(failure):
            self.log.warn("cannot reach API server {server} for user {user}: {error}",
                          server=self.upstream.describe(), user=meta.get("user"),
                          error=failure.getErrorMessage())
            stream.reset(F.UPSTREAM_UNREACHABLE, "agent of cluster %r cannot reach the API "
                         "server %s: %s" % (self.cluster, self.upstream.describe(),
                                             failure.getErrorMessage()))

        d.addErrback(failed)
        return stream

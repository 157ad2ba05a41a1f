"""What the relay's operators see: tunnels, streams, bytes and recent errors.

A :class:`RelayWatch` sits beside a :class:`~arc.relay.relay.Relay` and
observes it at connection and stream boundaries only, never per frame:

- it decorates the relay's ``accept`` callback, so it sees every tunnel
  accepted (agent: cluster, peer, version, since when; client: user) and
  every upgrade refused;
- on each accepted tunnel it chains the session's ``on_open`` (client
  tunnels: every stream open, or its refusal) and ``on_close`` callbacks;
- on each stream pair it chains the client half's ``on_end``: when the
  stream ends, both halves' byte counts are added and a reset
  (:attr:`arc.relay.splice.Half.rst`) is counted by its code.

The live numbers (tunnels, streams open, keepalive round trips) are read
from the relay's own tables when asked (:meth:`RelayWatch.snapshot`, the
Prometheus collector), so they cannot drift.  Recent refusals and resets
are kept in a ring buffer (the last 50) with their time and reason, never
a token.
"""

import time
from collections import Counter, deque
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from arc import __version__
from arc.identity.model import AuthError
from arc.metrics import code_name
from arc.relay.relay import AGENT_PATH, CLIENT_PATH
from arc.tunnel import frames as F
from arc.tunnel.carrier import HeadError
from arc.tunnel.session import RefuseStream

RECENT_ERRORS = 50
MAX_TEXT = 240
#: Resets that end a stream normally: kubectl closed its connection.
NOT_FAILURES = frozenset((F.NORMAL, F.CANCELLED))


def _text(value, limit=MAX_TEXT):
    """``value`` as short printable text, with anything token-like left out."""
    text = "".join(c if c.isprintable() else "?" for c in str(value or ""))[:limit]
    start = text.find("eyJ")
    if (start >= 0 and text.find(".", start) >= 0) or "bearer " in text.lower():
        return "[redacted: looked like a credential]"
    return text


def _peer(request):
    peer = request.peer
    host = getattr(peer, "host", None)
    if not host:
        return str(peer or "")
    return ("[%s]:%s" if ":" in host else "%s:%s") % (host, getattr(peer, "port", ""))


@dataclass
class AgentInfo:
    cluster: str
    peer: str
    version: str
    since: float


@dataclass
class ClientInfo:
    user: str
    peer: str
    since: float


@dataclass
class StreamInfo:
    cluster: str
    user: str
    since: float


class RelayWatch:
    """Observes ``relay``; ``walltime`` gives the times shown to people.

    Wraps ``relay.authenticator`` (when there is one) to count token
    refusals by their :class:`~arc.identity.model.AuthError` code.
    """

    log = Logger()

    def __init__(self, relay, walltime=time.time, recent=RECENT_ERRORS):
        self.relay = relay
        self.walltime = walltime
        self.started = walltime()
        self.agents = {}             # session -> AgentInfo
        self.clients = {}            # session -> ClientInfo
        self.streams = {}            # client Half -> StreamInfo
        self.errors = deque(maxlen=recent)
        self.opened = Counter()          # cluster -> streams opened
        self.bytes = Counter()           # (cluster, direction) -> bytes of ended streams
        self.failed = Counter()          # code name -> streams refused or reset
        self.auth_failures = Counter()   # (tunnel, reason) -> upgrades refused
        self.agent_connects = Counter()  # cluster -> agent tunnels accepted
        self.client_connects = 0
        if relay.authenticator is not None:
            relay.authenticator = _CountingAuthenticator(relay.authenticator, self)

    # -- upgrades ---------------------------------------------------------------------

    def accept(self, request):
        """The relay's ``accept``, observed (give this to the listener's factory)."""
        path = request.path.split("?", 1)[0]
        tunnel = {AGENT_PATH: "agent", CLIENT_PATH: "client"}.get(path)
        try:
            result = self.relay.accept(request)
        except HeadError as e:
            if tunnel is not None:
                self._refused(tunnel, request, e, count=True)
            raise
        if isinstance(result, defer.Deferred):
            def refused(failure):
                if failure.check(HeadError):
                    # Counted by the authenticator wrapper (it knows the code).
                    self._refused(tunnel, request, failure.value, count=False)
                return failure

            return result.addCallbacks(lambda start: self._started(tunnel, request, start),
                                       refused)
        return self._started(tunnel, request, result)

    def _refused(self, tunnel, request, error, count):
        if error.status not in (401, 403, 429):
            return
        message = error.message
        if count and error.status != 429:
            reason = self._reason(tunnel, request)
            self.auth_failures[(tunnel, reason)] += 1
            if reason == "unknown_cluster":
                # The name is whatever an unauthenticated peer sent: not shown.
                message = "the cluster it named is not registered at this relay"
        cluster = request.header("arc-cluster") if tunnel == "agent" else None
        self.note("%s refused" % (tunnel,), message, peer=_peer(request),
                  cluster=cluster if cluster in self.relay.registry.clusters else None)

    def _reason(self, tunnel, request):
        if request.bearer() is None:
            return "missing_token"
        if tunnel == "agent":
            if (request.header("arc-cluster") or "") not in self.relay.registry.clusters:
                return "unknown_cluster"
            return "bad_token"
        return "unknown_token"

    def _started(self, tunnel, request, start):
        def started(send, close):
            session = start(send, close)
            if tunnel == "agent":
                self._agent_up(session, request)
            elif tunnel == "client":
                self._client_up(session, request)
            return session

        return started

    # -- tunnels --------------------------------------------------------------------

    def _agent_up(self, session, request):
        version = _text(request.header("arc-version") or "", 40)
        self.agents[session] = AgentInfo(session.cluster, _peer(request), version,
                                         self.walltime())
        self.agent_connects[session.cluster] += 1
        _chain_close(session, self._agent_down)

    def _agent_down(self, session, code, reason):
        info = self.agents.pop(session, None)
        if info is not None:
            self.note("agent tunnel down", reason, cluster=info.cluster, peer=info.peer,
                      code=code_name(code) if code not in NOT_FAILURES else None)

    def _client_up(self, session, request):
        self.clients[session] = ClientInfo(session.identity.name, _peer(request),
                                           self.walltime())
        self.client_connects += 1
        _chain_close(session, lambda s, code, reason: self.clients.pop(s, None))
        on_open = session.on_open

        def opened(s, sid, metadata):
            try:
                half = on_open(s, sid, metadata)
            except RefuseStream as e:
                name = code_name(e.code)
                self.failed[name] += 1
                self.note("stream refused", e.reason, user=s.identity.name, code=name)
                raise
            self._stream_opened(half)
            return half

        session.on_open = opened

    # -- streams ----------------------------------------------------------------------

    def _stream_opened(self, half):
        cluster = half.peer.session.cluster
        self.opened[cluster] += 1
        self.streams[half] = StreamInfo(cluster, half.session.identity.name, self.walltime())
        on_end = half.on_end

        def ended(h):
            if on_end is not None:
                on_end(h)
            self._stream_ended(h)

        half.on_end = ended

    def _stream_ended(self, half):
        info = self.streams.pop(half, None)
        if info is None:
            return
        peer = half.peer
        self.bytes[(info.cluster, "client_to_agent")] += half.bytes
        self.bytes[(info.cluster, "agent_to_client")] += peer.bytes
        for side, rst in (("client", half.rst), ("agent", peer.rst)):
            if rst is not None and rst[0] not in NOT_FAILURES:
                name = code_name(rst[0])
                self.failed[name] += 1
                self.note("stream reset (%s side)" % (side,), rst[1], cluster=info.cluster,
                          user=info.user, code=name)
                break

    # -- the record --------------------------------------------------------------------

    def note(self, what, reason, *, cluster=None, user=None, peer=None, code=None):
        """Add an entry to the ring buffer of recent errors."""
        entry = {"time": self.walltime(), "what": what, "reason": _text(reason), "count": 1}
        for key, value in (("cluster", cluster), ("user", user), ("peer", peer),
                           ("code", code)):
            if value:
                entry[key] = _text(value, 80)
        last = self.errors[-1] if self.errors else None
        if last is not None and _same(last, entry):
            # A burst of the same error (kubectl retries) takes one line.
            last["count"] += 1
            last["time"] = entry["time"]
            if "peer" in entry:
                last["peer"] = entry["peer"]
            return
        self.errors.append(entry)

    def snapshot(self):
        """Everything the status page shows, as plain data (JSON-ready)."""
        relay = self.relay
        now = self.walltime()
        active = {}        # cluster -> [streams, client_to_agent, agent_to_client]
        users = {}         # (user, cluster) -> [streams, bytes]
        for half, info in self.streams.items():
            row = active.setdefault(info.cluster, [0, 0, 0])
            row[0] += 1
            row[1] += half.bytes
            row[2] += half.peer.bytes
            urow = users.setdefault((info.user, info.cluster), [0, 0, now])
            urow[0] += 1
            urow[1] += half.bytes + half.peer.bytes
            urow[2] = min(urow[2], info.since)
        clusters = []
        for name in sorted(set(relay.registry.clusters) | set(relay.agents)):
            agents = []
            for session in relay.agents.get(name, ()):
                info = self.agents.get(session)
                agents.append({
                    "peer": info.peer if info else "",
                    "version": info.version if info else "",
                    "since": info.since if info else None,
                    "rtt_ms": round(session.rtt * 1000, 3) if session.rtt is not None else None,
                    "streams": len(session.streams),
                    "draining": not session.can_open(),
                })
            live = active.get(name, [0, 0, 0])
            clusters.append({
                "name": name,
                "registered": name in relay.registry.clusters,
                "agents": agents,
                "streams_open": live[0],
                "streams_opened": self.opened.get(name, 0),
                "bytes_client_to_agent": self.bytes.get((name, "client_to_agent"), 0) + live[1],
                "bytes_agent_to_client": self.bytes.get((name, "agent_to_client"), 0) + live[2],
            })
        return {
            "relay": {"version": __version__, "started": self.started, "now": now,
                      "agent_tunnels": sum(len(t) for t in relay.agents.values()),
                      "client_tunnels": len(relay.clients),
                      "streams_open": len(self.streams)},
            "clusters": clusters,
            "users": [{"user": user, "cluster": cluster, "streams_open": row[0],
                       "bytes": row[1], "oldest": row[2]}
                      for (user, cluster), row in sorted(users.items())],
            "errors": list(reversed(self.errors)),
        }


def _same(a, b):
    return all(a.get(k) == b.get(k) for k in ("what", "reason", "cluster", "user", "code"))


def _chain_close(session, after):
    """Call ``after(session, code, reason)`` once the session's own on_close ran."""
    before = session.on_close

    def on_close(s, code, reason):
        if before is not None:
            before(s, code, reason)
        after(s, code, reason)

    session.on_close = on_close


class _CountingAuthenticator:
    """An authenticator that counts the tokens it refuses, by code (for the relay)."""

    def __init__(self, inner, watch):
        self._inner = inner
        self._watch = watch

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def authenticate(self, token):
        def passed(principal):
            if not principal:
                self._watch.auth_failures[("client", "unknown_token")] += 1
            return principal

        def failed(failure):
            if failure.check(AuthError):
                self._watch.auth_failures[("client", _text(failure.value.code, 40))] += 1
            return failure

        return self._inner.authenticate(token).addCallbacks(passed, failed)

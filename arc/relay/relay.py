"""The relay: authenticates tunnels, authorizes stream opens, pairs streams.

It never parses Kubernetes HTTP.  Agents connect to ``/arc/v1/agent`` with
their cluster's token; clients connect to ``/arc/v1/client`` with a user
token.  Every stream a client opens names a cluster; the relay checks the
access bindings, picks one of that cluster's agent tunnels and opens a
stream there, then frames flow between the two undecoded (see
:mod:`arc.relay.splice`).
"""

import json
from dataclasses import dataclass

from twisted.logger import Logger

from arc.identity.model import AuthError
from arc.ratelog import RateLimitedLog
from arc.relay.registry import Identity
from arc.relay.splice import Half, pair
from arc.tunnel import frames as F
from arc.tunnel.carrier import HeadError
from arc.tunnel.session import RefuseStream, Session, drain

AGENT_PATH = "/arc/v1/agent"
CLIENT_PATH = "/arc/v1/client"
MAX_OPEN_METADATA = 4096


def _json(status, obj):
    body = json.dumps(obj).encode()
    return (b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (status, len(body))) + body


@dataclass(frozen=True)
class RelayLimits:
    """The relay's ``limits:`` section: what one cluster or one user may hold."""

    max_agent_tunnels_per_cluster: int = 16
    max_streams_per_user: int = 10000


def parse_relay_limits(node):
    section = node.section("limits")
    limits = RelayLimits(
        max_agent_tunnels_per_cluster=section.positive(
            "max_agent_tunnels_per_cluster", int, RelayLimits.max_agent_tunnels_per_cluster),
        max_streams_per_user=section.positive(
            "max_streams_per_user", int, RelayLimits.max_streams_per_user),
    )
    section.finish()
    return limits


class Relay:
    log = Logger()

    def __init__(self, clock, registry, limits, authenticator=None,
                 relay_limits=RelayLimits()):
        self.clock = clock
        self.registry = registry
        self.authenticator = authenticator
        self.limits = limits
        self.relay_limits = relay_limits
        self.agents = {}      # cluster -> list of sessions
        self.clients = set()
        self.user_streams = {}   # user name -> streams open
        self.violations = RateLimitedLog(clock)
        self.streams_open = 0
        self.streams_total = 0

    # -- listener callbacks ---------------------------------------------------

    def plain(self, request):
        path = request.path.split("?", 1)[0]
        if path in ("/healthz", "/readyz"):
            # Counts only (no names): enough to watch for leaks and load.
            return _json(200, {"status": "ok",
                               "agent_tunnels": sum(len(t) for t in self.agents.values()),
                               "client_tunnels": len(self.clients),
                               "streams_open": self.streams_open})
        return _json(404, {"message": "not found: the relay serves tunnels at %s and %s"
                                      % (AGENT_PATH, CLIENT_PATH)})

    def accept(self, request):
        path = request.path.split("?", 1)[0]
        if path == AGENT_PATH:
            return self._accept_agent(request)
        if path == CLIENT_PATH:
            return self._accept_client(request)
        raise HeadError(404, "no tunnel endpoint at %s (agents use %s, clients %s)"
                        % (path, AGENT_PATH, CLIENT_PATH))

    def _accept_agent(self, request):
        cluster = request.header("arc-cluster") or ""
        token = request.bearer()
        peer = _peer(request)
        if cluster not in self.registry.clusters:
            self.log.warn("agent refused: cluster {cluster!r} is not registered (peer {peer})",
                          cluster=cluster, peer=peer)
            raise HeadError(401, "cluster %r is not registered at this relay" % (cluster,))
        if not self.registry.agent_ok(cluster, token):
            self.log.warn("agent refused: wrong or missing token for cluster {cluster} "
                          "(peer {peer})", cluster=cluster, peer=peer)
            raise HeadError(401, "agent token rejected for cluster %r" % (cluster,))
        most = self.relay_limits.max_agent_tunnels_per_cluster
        if len(self.agents.get(cluster, ())) >= most:
            self.violations.emit(("agents", cluster), self.log.warn,
                                 "agent refused: cluster {cluster} already has {n} agent "
                                 "tunnels (limits.max_agent_tunnels_per_cluster) (peer {peer})",
                                 cluster=cluster, n=most, peer=peer)
            raise HeadError(429, "cluster %r already has %d agent tunnels, the relay's limit "
                                 "(limits.max_agent_tunnels_per_cluster): stop extra agent "
                                 "replicas or raise the limit" % (cluster, most))

        def start(send, close):
            session = Session(dialer=False, clock=self.clock, limits=self.limits,
                              name="agent:%s@%s" % (cluster, peer),
                              on_close=self._agent_closed, views=True)
            session.cluster = cluster
            session.connected(send, close)
            self.agents.setdefault(cluster, []).append(session)
            self.log.info("agent tunnel up: cluster={cluster} peer={peer} tunnels={n}",
                          cluster=cluster, peer=peer, n=len(self.agents[cluster]))
            return session

        return start

    def _accept_client(self, request):
        """Static user tokens from the registry, else the identity providers."""
        token = request.bearer()
        peer = _peer(request)
        identity = self.registry.user(token)
        if identity is not None:
            return self._client_start(identity, peer)
        if self.authenticator is None or not token:
            self.log.warn("client refused: unknown or missing user token (peer {peer})",
                          peer=peer)
            raise HeadError(401, "user token rejected: unknown, revoked or missing")

        def authenticated(principal):
            if not principal:
                raise HeadError(401, "user token rejected: unknown, revoked or missing")
            return self._client_start(Identity(principal.username, tuple(principal.groups)),
                                      peer)

        def refused(failure):
            failure.trap(AuthError)
            self.log.warn("client refused: {reason} (peer {peer})",
                          reason=failure.value.reason, peer=peer)
            raise HeadError(401, "user token rejected: %s" % (failure.value.reason,))

        return self.authenticator.authenticate(token).addCallbacks(authenticated, refused)

    def _client_start(self, identity, peer):
        def start(send, close):
            session = Session(dialer=False, clock=self.clock, limits=self.limits,
                              name="client:%s@%s" % (identity.name, peer),
                              on_open=self._client_open, on_close=self._client_closed,
                              views=True)
            session.identity = identity
            session.connected(send, close)
            self.clients.add(session)
            self.log.info("client tunnel up: user={user} peer={peer}",
                          user=identity.name, peer=peer)
            return session

        return start

    # -- sessions ---------------------------------------------------------------

    def _agent_closed(self, session, code, reason):
        tunnels = self.agents.get(session.cluster, [])
        if session in tunnels:
            tunnels.remove(session)
        if not tunnels:
            self.agents.pop(session.cluster, None)
        self.log.info("agent tunnel down: cluster={cluster} reason={reason}",
                      cluster=session.cluster, reason=reason)

    def _client_closed(self, session, code, reason):
        self.clients.discard(session)
        self.log.info("client tunnel down: user={user} reason={reason}",
                      user=session.identity.name, reason=reason)

    def _pick_agent(self, cluster):
        best = None
        for session in self.agents.get(cluster, ()):
            if session.can_open() and (best is None or len(session.streams) < len(best.streams)):
                best = session
        return best

    def _client_open(self, session, sid, metadata):
        identity = session.identity
        try:
            if len(metadata) > MAX_OPEN_METADATA:
                raise ValueError("too large")
            meta = json.loads(metadata)
            cluster = meta["cluster"]
            if not isinstance(cluster, str):
                raise ValueError("cluster must be a string")
        except (ValueError, KeyError, TypeError) as e:
            raise RefuseStream(F.PROTOCOL_ERROR, "bad stream open metadata: %s" % (e,))
        if cluster not in self.registry.clusters:
            raise RefuseStream(F.UNKNOWN_CLUSTER,
                               "cluster %r is not registered at the relay" % (cluster,))
        if not self.registry.allowed(identity, cluster):
            self.log.warn("stream refused: user {user} is not bound to cluster {cluster}",
                          user=identity.name, cluster=cluster)
            raise RefuseStream(F.FORBIDDEN,
                               "user %r may not reach cluster %r: no access binding names the "
                               "user or one of its groups" % (identity.name, cluster))
        open_now = self.user_streams.get(identity.name, 0)
        most = self.relay_limits.max_streams_per_user
        if open_now >= most:
            self.violations.emit(("user-streams", identity.name), self.log.warn,
                                 "stream refused: user {user} has {n} streams open "
                                 "(limits.max_streams_per_user)", user=identity.name, n=most)
            raise RefuseStream(F.LIMIT_EXCEEDED,
                               "user %r has %d streams open through the relay, its limit "
                               "(limits.max_streams_per_user): close some watches or "
                               "port-forwards, or ask the operator to raise the limit"
                               % (identity.name, most))
        agent = self._pick_agent(cluster)
        if agent is None:
            raise RefuseStream(F.CLUSTER_OFFLINE,
                               "cluster %r is offline: its agent is not connected to the relay"
                               % (cluster,))
        client_half = Half(session, "the client", self._stream_ended)
        client_half.id = sid
        agent_half = Half(agent, "the agent of cluster %r" % (cluster,))
        pair(client_half, agent_half)
        forwarded = json.dumps({"cluster": cluster, "user": identity.name,
                                "groups": list(identity.groups),
                                "request": meta.get("request")}).encode()
        try:
            agent_half.id = agent.open(agent_half, forwarded)
        except RefuseStream as e:
            raise RefuseStream(F.CLUSTER_OFFLINE, "cluster %r cannot take streams now: %s"
                               % (cluster, e.reason))
        self.streams_open += 1
        self.streams_total += 1
        self.user_streams[identity.name] = open_now + 1
        return client_half

    def _stream_ended(self, half):
        self.streams_open -= 1
        name = half.session.identity.name
        left = self.user_streams.get(name, 1) - 1
        if left > 0:
            self.user_streams[name] = left
        else:
            self.user_streams.pop(name, None)

    def sessions(self):
        """Every tunnel: agents' and clients'."""
        found = [s for tunnels in self.agents.values() for s in tunnels]
        found.extend(self.clients)
        return found

    def stopping(self):
        """Graceful stop: refuse new streams on every tunnel."""
        for session in self.sessions():
            session.goAway(F.GOING_AWAY)

    def drain(self, timeout):
        """Let running streams finish, then close every tunnel.

        Fires once no stream is left, or after ``timeout`` seconds, when the
        streams still running are reset (``GOING_AWAY``).
        """
        sessions = self.sessions()
        if self.streams_open:
            self.log.info("draining: {n} streams running, up to {t} s",
                          n=self.streams_open, t=timeout)

        def drained(reset):
            if reset:
                self.log.warn("drain deadline of {t} s passed: reset the streams still "
                              "running", t=timeout)
            for session in sessions:
                session.close("the relay stopped")

        reason = "the relay is stopping (its drain deadline of %.0f s passed)" % (timeout,)
        return drain(sessions, self.clock, timeout, reason).addCallback(drained)


def _peer(request):
    peer = request.peer
    host = getattr(peer, "host", None)
    return "%s:%s" % (host, getattr(peer, "port", "")) if host else str(peer)

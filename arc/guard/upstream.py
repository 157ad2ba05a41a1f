"""Connections to kube-apiserver, with or without the guard's credentials.

Two kinds of connection are made:

- *passthrough*: the caller's own bearer token travels in the request and
  the API server judges it.  The connection carries NO credential of the
  guard's — a client certificate here would let the API server
  authenticate the request as the guard.
- *guard*: the request carries impersonation headers, and the guard proves
  its own identity with a client certificate (TLS) or a bearer token (a
  service-account token file, re-read periodically so rotation works).
"""

from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.logger import Logger

from arc.errors import ConfigError
from arc.tls import client_options, insecure_client_options
from arc.tlssocket import TLSClientEndpoint

GUARD = "guard"
PASSTHROUGH = "passthrough"

# Keep-alive connections to the API server left idle by a finished client
# connection serve the next one, so that a new kubectl connection does not
# cost a TLS handshake with the API server.
MAX_IDLE = 32
IDLE_TIMEOUT = 30.0


class IdleConnections(Service):
    """Idle keep-alive connections to the API server, by mode.

    A connection is kept only between two requests (its last answer was
    complete and did not say ``Connection: close``); a request always
    carries its own credentials (the caller's token in passthrough mode,
    the guard's own plus impersonation otherwise), and the modes are never
    mixed, so a connection can serve any caller of its mode.  While parked,
    a connection that the API server closes, or that says anything, is
    dropped; so is one idle for longer than ``timeout``.
    """

    def __init__(self, clock, most=MAX_IDLE, timeout=IDLE_TIMEOUT):
        self.clock = clock
        self.most = most
        self.timeout = timeout
        self._idle = {}         # mode -> list of (side, timer)

    def __len__(self):
        return sum(len(v) for v in self._idle.values())

    def put(self, mode, side):
        """Park ``side`` (an upstream protocol); False if it cannot be kept."""
        transport = side.transport
        if (transport is None or not transport.connected or transport.disconnecting
                or len(self) >= self.most):
            return False
        transport.resumeProducing()     # a parked connection must notice a close
        side.guard = self
        side.dataReceived = lambda data, side=side: self._unexpected(side)
        timer = self.clock.callLater(self.timeout, self._expire, mode, side)
        self._idle.setdefault(mode, []).append((side, timer))
        return True

    def take(self, mode):
        """The most recently parked connection of ``mode``, or None."""
        idle = self._idle.get(mode)
        while idle:
            side, timer = idle.pop()
            if timer.active():
                timer.cancel()
            transport = side.transport
            if transport is not None and transport.connected and not transport.disconnecting:
                return side
        return None

    def _forget(self, side):
        for mode, idle in self._idle.items():
            for i, (parked, timer) in enumerate(idle):
                if parked is side:
                    del idle[i]
                    if timer.active():
                        timer.cancel()
                    return

    def _expire(self, mode, side):
        self._forget(side)
        side.transport.loseConnection()

    def _unexpected(self, side):
        # Bytes nobody asked for: the connection's framing is unknown now.
        self._forget(side)
        side.transport.abortConnection()

    def upstream_lost(self, side, reason):
        self._forget(side)

    def stopService(self):
        super().stopService()
        self.close()

    def close(self):
        for idle in self._idle.values():
            for side, timer in idle:
                if timer.active():
                    timer.cancel()
                side.transport.loseConnection()
        self._idle = {}


class APIServer:
    log = Logger()

    def __init__(self, reactor, target, timeout=10.0):
        self.reactor = reactor
        self.target = target
        self.timeout = timeout
        self.idle = IdleConnections(reactor)
        self._token = target.token
        if target.insecure_skip_tls_verify:
            self.log.warn("upstream {server}: insecure-skip-tls-verify is set; the API "
                          "server's certificate is NOT checked", server=target.server)
            self._plain = insecure_client_options()
            self._guard = self._plain
        else:
            name = target.tls_server_name or target.host
            self._plain = client_options(name, ca_pem=target.ca_pem)
            self._guard = self._plain
            if target.client_cert_pem and target.client_key_pem:
                self._guard = client_options(name, ca_pem=target.ca_pem,
                                             client_cert_pem=target.client_cert_pem,
                                             client_key_pem=target.client_key_pem)
        self.refresh_token()
        host = target.host
        if isIPAddress(host):
            self._endpoint = lambda: TCP4ClientEndpoint(reactor, host, target.port,
                                                        timeout=timeout)
        elif isIPv6Address(host):
            self._endpoint = lambda: TCP6ClientEndpoint(reactor, host, target.port,
                                                        timeout=timeout)
        else:
            # A name is resolved again for each connection (the API server's
            # addresses may change); an address needs no resolver.
            self._endpoint = lambda: HostnameEndpoint(reactor, host, target.port,
                                                      timeout=timeout)

    @property
    def has_credentials(self):
        return bool(self._token) or self._guard is not self._plain

    def refresh_token(self):
        """Re-read the token file (service-account tokens rotate)."""
        if self.target.token_file:
            try:
                token = self.target.bearer_token()
            except (OSError, ConfigError) as e:
                # Keep the last good token: a rotation writes a new file, never none.
                self.log.error("cannot read the guard's token file {path}: {error}",
                               path=self.target.token_file, error=str(e))
                return
            if token:
                self._token = token

    def credential_headers(self):
        if self._token and self._guard is self._plain:
            return [["Authorization", "Bearer " + self._token]]
        return []

    def describe(self):
        return self.target.server

    def connect(self, mode, factory):
        endpoint = self._endpoint()
        tls = self._guard if mode == GUARD else self._plain
        return TLSClientEndpoint(tls, endpoint).connect(factory)

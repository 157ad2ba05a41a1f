"""Keep one outbound tunnel to the relay up, whatever happens.

:class:`TunnelDialer` is a ``Service`` around ``ClientService``: it dials
the relay over TLS (name checked with service_identity), sends the upgrade
request with the bearer credential, and counts an attempt as successful
only once the relay answered ``101``.  Any loss — network, relay restart,
dead-peer detection — is followed by a new attempt after a full-jitter
exponential backoff, so a fleet of agents does not stampede a relay that
comes back.  When the relay drains the tunnel (GOAWAY), a replacement is
dialed at once (after a short jitter) while the old tunnel finishes its
streams.

``addresses`` pins the dialer to IP addresses of relay replicas, tried in
turn at each attempt; TLS still checks the certificate against the URL's
host name (or ``server_name``).  :mod:`arc.tunnel.replicas` runs one dialer
per replica address.
"""

import random
from urllib.parse import urlsplit

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from arc.tls import is_tls_failure
from arc.tlssocket import TLSClientEndpoint
from arc.tunnel.carrier import RawDialerFactory, UpgradeRefused, websocket_dialer_factory
from arc.tunnel.connectproxy import HTTPConnectEndpoint, ProxyError, proxy_for
from arc.tunnel.session import drain


def full_jitter(initial=0.5, maximum=30.0, factor=2.0, rng=random.random):
    """Backoff policy: uniform in [0, min(maximum, initial * factor**n)]."""

    def policy(attempt):
        ceiling = min(maximum, initial * factor ** min(attempt, 64))
        return max(0.05, ceiling * rng())

    return policy


def explain_refusal(what, failure):
    """One line naming the cause of a failed tunnel attempt, and the fix."""
    try:
        return _explain(what, failure)
    except Exception:   # an explanation must never break the reconnect loop
        return failure.getErrorMessage()


def _explain(what, failure):
    exc = failure.value
    if isinstance(exc, UpgradeRefused):
        if exc.status == 401:
            return ("relay rejected the %s credential: %s (check the token file and the "
                    "relay's registry)" % (what, exc.message))
        if exc.status == 403:
            return "relay refused the %s: %s" % (what, exc.message)
        if exc.status:
            return "relay answered %d: %s" % (exc.status, exc.message)
        return exc.message
    if isinstance(exc, ProxyError):
        return "%s (check HTTPS_PROXY/NO_PROXY or relay.proxy)" % (exc,)
    if is_tls_failure(exc):
        return ("TLS handshake with the relay failed: its certificate is not valid for the "
                "expected name or not signed by a trusted CA (%s); check relay.url, "
                "relay.server_name and relay.ca_file" % (_tls_detail(exc),))
    return failure.getErrorMessage()


def _tls_detail(exc):
    errors = getattr(exc, "errors", None)
    if errors:   # service_identity: the names that did not match
        return "; ".join(str(e) for e in errors)
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list):   # OpenSSL: [(lib, func, reason), ...]
        return "; ".join(str(part[-1]) for part in args[0]
                         if isinstance(part, tuple) and part) or str(exc)
    return str(exc)


class _ReportingEndpoint:
    """Records and logs why a connection attempt failed (refused, DNS, proxy, TLS)."""

    def __init__(self, endpoint, dialer):
        self.endpoint = endpoint
        self.dialer = dialer

    def connect(self, factory):
        def failed(failure):
            dialer = self.dialer
            dialer.last_error = explain_refusal(dialer.what, failure)
            dialer.log.error("cannot reach the relay {url}: {error}", url=dialer.where,
                             error=dialer.last_error)
            return failure

        return self.endpoint.connect(factory).addErrback(failed)


class _RotatingEndpoint:
    """Each connection attempt goes to the next of ``endpoints``."""

    def __init__(self, endpoints):
        self.endpoints = list(endpoints)
        self.next = 0

    def connect(self, factory):
        endpoint = self.endpoints[self.next % len(self.endpoints)]
        self.next += 1
        return endpoint.connect(factory)


class TunnelDialer(Service):
    """Dial ``relay_url`` and keep a tunnel session up.

    :param make_session: returns a fresh, not yet connected, Session.
    :param credential: callable returning the bearer token (re-read at each
        attempt, so a rotated token file is picked up).
    :param drain_timeout: on stop, seconds the running streams may take to
        finish after GOAWAY before they are reset.
    :param addresses: IP addresses to dial in turn instead of the URL's host
        name (relay replicas); the certificate is still checked against the name.
    """

    log = Logger()

    def __init__(self, reactor, *, relay_url, path, credential, make_session, tls_options,
                 transport="tunnel", extra_headers=None, what="agent", backoff=None,
                 ws_mask=True, proxy=None, drain_timeout=30.0, addresses=None):
        self.reactor = reactor
        self.relay_url = relay_url
        self.path = path
        self.credential = credential
        self.make_session = make_session
        self.tls_options = tls_options
        self.transport = transport
        self.extra_headers = dict(extra_headers or {})
        self.what = what
        self.backoff = backoff or full_jitter()
        self.ws_mask = ws_mask
        self.proxy = proxy
        self.drain_timeout = drain_timeout
        self.addresses = list(addresses or ())
        # What the logs name: the URL, and the replica address when pinned to one.
        self.where = relay_url if len(self.addresses) != 1 else "%s (%s)" % (
            relay_url, self.addresses[0])
        self.session = None
        self._retiring = {}        # ClientService whose tunnel drains -> its session
        self._replacing = None     # the delayed call dialing a replacement
        self.last_error = None
        self.connects = 0
        self._client = None

    def pinned(self, address=None):
        """A copy of this dialer dialing ``address`` only (None: this dialer itself)."""
        if address is None:
            return self
        return TunnelDialer(
            self.reactor, relay_url=self.relay_url, path=self.path, credential=self.credential,
            make_session=self.make_session, tls_options=self.tls_options,
            transport=self.transport, extra_headers=self.extra_headers, what=self.what,
            backoff=self.backoff, ws_mask=self.ws_mask, proxy=self.proxy,
            drain_timeout=self.drain_timeout, addresses=[address])

    def _headers(self):
        headers = dict(self.extra_headers)
        headers["Authorization"] = "Bearer " + self.credential()
        return headers

    def _endpoint(self):
        parts = urlsplit(self.relay_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = proxy_for(parts.hostname, self.proxy)
        if proxy:
            self.log.info("reaching the relay through the proxy {proxy}",
                          proxy=urlsplit(proxy)._replace(netloc=urlsplit(proxy).hostname or "")
                          .geturl())
        endpoints = []
        for host in self.addresses or [parts.hostname]:
            if proxy:
                endpoint = HTTPConnectEndpoint(self.reactor, proxy, host, port)
            else:
                endpoint = HostnameEndpoint(self.reactor, host, port)
            if parts.scheme == "https":
                # Connect to the address, check the certificate against the name.
                endpoint = TLSClientEndpoint(self.tls_options, endpoint)
            endpoints.append(endpoint)
        endpoint = endpoints[0] if len(endpoints) == 1 else _RotatingEndpoint(endpoints)
        return _ReportingEndpoint(endpoint, self)

    def _factory(self):
        parts = urlsplit(self.relay_url)
        host = parts.netloc
        dialer = self

        class _Factory:
            # Built lazily per attempt so the credential is re-read each time.
            def doStart(self):
                pass

            def doStop(self):
                pass

            def buildProtocol(self, addr):
                try:
                    headers = dialer._headers()
                except Exception as e:
                    dialer.last_error = str(e)
                    dialer.log.error("cannot read the {what} credential: {error}",
                                     what=dialer.what, error=str(e))
                    return None
                if dialer.transport == "websocket":
                    scheme = "wss" if parts.scheme == "https" else "ws"
                    factory = websocket_dialer_factory(
                        "%s://%s%s" % (scheme, host, dialer.path), headers,
                        dialer.make_session, mask=dialer.ws_mask)
                else:
                    factory = RawDialerFactory(host, dialer.path, headers, dialer.make_session,
                                               dialer.reactor)
                protocol = factory.buildProtocol(addr)
                protocol.factory = factory
                return protocol

        return _Factory()

    def _prepare(self, protocol):
        d = protocol.upgraded

        def up(session):
            self.session = session
            if not self.running:
                # Connected while stopping: this tunnel takes no streams.
                session.goAway()
            self.connects += 1
            self.last_error = None
            self._watch(session)
            self.log.info("tunnel to {url} up ({transport}{peer})", url=self.where,
                          transport=self.transport, peer=self._peer(protocol))
            return session

        def refused(failure):
            self.last_error = explain_refusal(self.what, failure)
            self.log.error("tunnel to {url} failed: {error}", url=self.where,
                           error=self.last_error)
            return failure

        return d.addCallbacks(up, refused)

    def _new_client(self):
        if self._endpoint_cache is None:
            self._endpoint_cache = self._endpoint()
        client = ClientService(self._endpoint_cache, self._factory(), retryPolicy=self.backoff,
                               clock=self.reactor, prepareConnection=self._prepare)
        client.startService()
        return client

    _endpoint_cache = None

    def _watch(self, session):
        """Hear of the relay's GOAWAY and of the tunnel's end (chaining the owner's hooks)."""
        on_goaway, on_close = session.on_goaway, session.on_close

        def goaway(s, code):
            if on_goaway is not None:
                on_goaway(s, code)
            self._relay_draining(s)

        def closed(s, code, reason):
            if on_close is not None:
                on_close(s, code, reason)
            self.log.info("tunnel to {url} down: {reason}", url=self.where, reason=reason)
            for client, retiring in list(self._retiring.items()):
                if retiring is s:
                    # Its replacement runs: this one must not reconnect.
                    del self._retiring[client]
                    self.reactor.callLater(0, client.stopService)

        session.on_goaway, session.on_close = goaway, closed

    def _relay_draining(self, session):
        """The relay sent GOAWAY: dial a replacement now, let this tunnel drain."""
        if not self.running or session is not self.session or self._client is None:
            return
        if self._replacing is not None and self._replacing.active():
            return
        delay = self.backoff(0)     # jittered: a fleet does not move all at once
        self.log.info("relay {url} drains the tunnel (GOAWAY): dialing a replacement in "
                      "{delay:.2f} s while running streams finish", url=self.where, delay=delay)

        def replace():
            self._replacing = None
            if not self.running or self.session is not session:
                return      # stopping, or a new tunnel is already up
            old, self._client = self._client, None
            if old is not None:
                if session.closed:
                    self.reactor.callLater(0, old.stopService)
                else:
                    self._retiring[old] = session
            self._client = self._new_client()

        self._replacing = self.reactor.callLater(delay, replace)

    def _peer(self, protocol):
        """``, via ADDRESS`` when the dialer rotates over several addresses."""
        if len(self.addresses) < 2:
            return ""
        try:
            return ", via %s" % (protocol.transport.getPeer().host,)
        except Exception:
            return ""

    def startService(self):
        super().startService()
        self._client = self._new_client()

    def stopService(self):
        """GOAWAY, let the running streams finish (bounded), then close the tunnel."""
        super().stopService()
        if self._replacing is not None and self._replacing.active():
            self._replacing.cancel()
        self._replacing = None
        clients = [self._client] + list(self._retiring)
        self._client = None
        retiring, self._retiring = list(self._retiring.values()), {}
        d = self.drain(retiring)

        def stop(_):
            return defer.DeferredList([c.stopService() for c in clients if c is not None])

        d.addCallback(stop)
        return d

    def drain(self, others=()):
        """Refuse new streams and wait until the running ones have ended.

        Fires once the tunnel (and ``others``, tunnels the relay is draining)
        has no stream left, or after ``drain_timeout`` seconds, when the
        streams still running are reset (``GOING_AWAY``).
        """
        sessions = [s for s in [self.session] + list(others) if s is not None and not s.closed]
        if not sessions:
            return defer.succeed(None)
        for session in sessions:
            session.goAway()
        running = sum(len(s.streams) for s in sessions)
        if running:
            self.log.info("draining the tunnel to {url}: {n} streams running, up to {t} s",
                          url=self.where, n=running, t=self.drain_timeout)

        def drained(reset):
            if reset:
                self.log.warn("drain deadline of {t} s passed: reset {n} streams still running",
                              t=self.drain_timeout, n=reset)

        reason = ("the %s is stopping (its drain deadline of %.0f s passed)"
                  % ({"user": "arc client"}.get(self.what, self.what), self.drain_timeout))
        return drain(sessions, self.reactor, self.drain_timeout, reason).addCallback(drained)

    def whenUp(self):
        """Deferred firing with a connected session."""
        return self._client.whenConnected().addCallback(lambda protocol: self.session)

"""One tunnel to every relay replica.

Relays scale out as N replicas sharing one configuration and no live
state: an agent keeps a tunnel to each, so whichever replica a user's
connection lands on can reach the cluster.  :class:`ReplicaDialers` holds
one :class:`~arc.tunnel.dial.TunnelDialer` per replica address: the
``relay.addresses`` list, or every IPv4 and IPv6 address the relay URL's
host name resolves to (a Kubernetes headless Service gives one per pod),
resolved again every ``relay.resolve_interval`` seconds without blocking
the reactor; dialers come and go with the addresses.  TLS checks each
replica's certificate against the URL's host name, not the address.

To the rest of the agent it looks like one dialer (``session``,
``connects``, ``last_error``, ``relay_url``, ``drain``): it is up while at
least one replica's tunnel is.
"""

from urllib.parse import urlsplit

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class _Collect:
    """An ``IResolutionReceiver`` gathering addresses into a Deferred."""

    def __init__(self):
        self.addresses = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        host = getattr(address, "host", None)
        if host and host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self):
        self.done.callback(self.addresses)


def resolve_all(reactor, name):
    """Deferred list of every IPv4 and IPv6 address of ``name`` (resolver thread)."""
    receiver = _Collect()
    reactor.nameResolver.resolveHostName(receiver, name)
    return receiver.done


class ReplicaDialers(MultiService):
    """A tunnel to each address of the relay.

    :param link: the :class:`~arc.tunnel.settings.RelayLink`.
    :param make_dialer: ``make_dialer(address)`` returns a TunnelDialer
        pinned to that address.
    """

    log = Logger()

    def __init__(self, reactor, link, make_dialer, resolve=resolve_all):
        super().__init__()
        self.reactor = reactor
        self.link = link
        self.relay_url = link.url
        self.host = urlsplit(link.url).hostname
        self.make_dialer = make_dialer
        self.resolve = resolve
        self.dialers = {}           # address -> TunnelDialer
        self.resolve_error = None
        self._loop = None
        self._retry = None

    # -- looks like one dialer ---------------------------------------------------------

    @property
    def session(self):
        """A tunnel that may open streams, else any live one, else None."""
        live = [d.session for d in self.dialers.values()
                if d.session is not None and not d.session.closed]
        for session in live:
            if session.can_open():
                return session
        return live[0] if live else None

    @property
    def connects(self):
        return sum(d.connects for d in self.dialers.values())

    @property
    def last_error(self):
        if not self.dialers:
            return self.resolve_error or "resolving %s" % (self.host,)
        errors = ["%s: %s" % (a, d.last_error or "connecting")
                  for a, d in sorted(self.dialers.items()) if not _up(d)]
        return "; ".join(errors) or None

    def state(self):
        """``{address: "up" | "draining" | "down"}``, one entry per replica."""
        return {address: _state(d) for address, d in sorted(self.dialers.items())}

    @property
    def tunnels_up(self):
        return sum(1 for d in self.dialers.values() if _up(d))

    def drain(self):
        return defer.DeferredList([d.drain() for d in self.dialers.values()])

    # -- the set of replicas -------------------------------------------------------------

    def startService(self):
        super().startService()
        if self.link.addresses:
            self.update(self.link.addresses)
        else:
            self._loop = LoopingCall(self.refresh)
            self._loop.clock = self.reactor
            self._loop.start(self.link.resolve_interval, now=True)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return super().stopService()

    def refresh(self):
        """Resolve the relay's name again and follow its addresses; never fails."""
        d = self.resolve(self.reactor, self.host)

        def resolved(addresses):
            if not addresses:
                raise LookupError("no address")
            self.resolve_error = None
            self.update(addresses)

        def failed(failure):
            self.resolve_error = "cannot resolve the relay's host name %s: %s" % (
                self.host, failure.getErrorMessage())
            self.log.error("{error}; keeping the {n} known replicas, trying again",
                           error=self.resolve_error, n=len(self.dialers))
            if not self.dialers and self.running:
                # Nothing to dial yet: try again soon rather than at the next interval.
                delay = min(self.link.resolve_interval, self.link.reconnect_initial * 4)
                if self._retry is None or not self._retry.active():
                    self._retry = self.reactor.callLater(delay, self.refresh)

        d.addCallbacks(resolved, failed)
        d.addErrback(lambda f: self.log.failure("following the relay replicas", f))
        return d

    def update(self, addresses):
        """Dial new addresses, drain and drop the ones that went away."""
        if not self.running:
            return
        addresses = list(dict.fromkeys(addresses))
        added = [a for a in addresses if a not in self.dialers]
        gone = [a for a in self.dialers if a not in addresses]
        for address in gone:
            dialer = self.dialers.pop(address)
            self.log.info("relay replica {address} of {url} is gone: draining its tunnel",
                          address=address, url=self.relay_url)
            dialer.disownServiceParent()
        for address in added:
            dialer = self.make_dialer(address)
            self.dialers[address] = dialer
            dialer.setServiceParent(self)
        if added or gone:
            self.log.info("relay {url}: {n} replicas ({addresses})", url=self.relay_url,
                          n=len(self.dialers), addresses=", ".join(sorted(self.dialers)))


def _up(dialer):
    session = dialer.session
    return session is not None and not session.closed and session.can_open()


def _state(dialer):
    session = dialer.session
    if session is None or session.closed:
        return "down"
    return "up" if session.can_open() else "draining"


def replica_dialers(reactor, link, make_dialer):
    """The agent's dialer: one per replica, or one by name behind an HTTP proxy.

    Through a proxy (``relay.proxy`` or ``HTTPS_PROXY``) the agent may not be
    able to resolve the relay's name itself, so unless ``relay.addresses``
    lists the replicas it keeps a single tunnel, through the proxy, by name.
    """
    from arc.tunnel.connectproxy import proxy_for
    if not link.addresses and proxy_for(urlsplit(link.url).hostname, link.proxy):
        return make_dialer(None)
    return ReplicaDialers(reactor, link, make_dialer)

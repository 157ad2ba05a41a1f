"""Dialing the relay through an HTTP CONNECT proxy (corporate egress).

``HTTPS_PROXY``/``https_proxy`` and ``NO_PROXY``/``no_proxy`` are read the
way most tools read them (the standard library's rules: host suffixes,
``*``, ports); a relay configuration may also name a proxy, or ``none``.
The CONNECT exchange happens on a plain TCP connection to the proxy, then
TLS to the relay runs inside it, so a TLS-intercepting proxy is detected by
the relay certificate check (give its CA with the relay's ``ca_file``).
"""

import base64
import urllib.request
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol

MAX_ANSWER = 16 * 1024


class ProxyError(Exception):
    pass


def proxy_for(host, configured=None, environ=None):
    """The proxy URL to reach ``host`` through, or None for a direct connection."""
    if configured == "none":
        return None
    if configured:
        return configured
    if environ is None:
        proxies = urllib.request.getproxies_environment()
    else:
        proxies = {}
        for name in sorted(environ, key=str.islower):   # lower-case names win
            if name.lower().endswith("_proxy") and environ[name]:
                proxies[name.lower()[:-6]] = environ[name]
    url = proxies.get("https")
    if not url or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return url


class _ConnectProtocol(Protocol):
    def __init__(self, target, auth, factory, done):
        self.target = target
        self.auth = auth
        self.wrapped_factory = factory   # not .factory: Factory.buildProtocol sets that
        self.done = done
        self.inner = None
        self.buf = b""

    def connectionMade(self):
        lines = ["CONNECT %s HTTP/1.1" % self.target, "Host: %s" % self.target]
        if self.auth:
            lines.append("Proxy-Authorization: Basic %s" % self.auth)
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def dataReceived(self, data):
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_ANSWER:
                self._fail("the proxy's answer to CONNECT is too long")
            return
        status_line = self.buf.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        rest = self.buf[end + 4:]
        self.buf = b""
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            self._fail("the proxy refused CONNECT %s: %s" % (self.target, status_line))
            return
        inner = self.wrapped_factory.buildProtocol(self.transport.getPeer())
        if inner is None:
            self.transport.loseConnection()
            self.done.errback(ProxyError("connection refused by the protocol factory"))
            return
        self.inner = inner
        # The tunnel protocol now owns this connection; bytes are forwarded.
        self.dataReceived = inner.dataReceived
        inner.makeConnection(self.transport)
        self.done.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def _fail(self, message):
        self.transport.loseConnection()
        if not self.done.called:
            self.done.errback(ProxyError(message))

    def connectionLost(self, reason):
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.done.called:
            self.done.errback(ProxyError("the proxy closed the connection during CONNECT: %s"
                                         % (reason.getErrorMessage(),)))


class HTTPConnectEndpoint:
    """An IStreamClientEndpoint reaching ``host:port`` through ``proxy_url``."""

    def __init__(self, reactor, proxy_url, host, port, timeout=30):
        parts = urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
        if parts.scheme != "http":
            raise ValueError("only http:// proxies are supported, not %r" % (proxy_url,))
        self.proxy = HostnameEndpoint(reactor, parts.hostname, parts.port or 80, timeout=timeout)
        self.target = "%s:%d" % ("[%s]" % host if ":" in host else host, port)
        self.auth = None
        if parts.username:
            credentials = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
            self.auth = base64.b64encode(credentials.encode()).decode()
        self.description = "%s://%s:%s" % (parts.scheme, parts.hostname, parts.port or 80)

    def connect(self, factory):
        done = defer.Deferred()

        def build():
            return _ConnectProtocol(self.target, self.auth, factory, done)

        d = self.proxy.connect(Factory.forProtocol(build))
        d.addErrback(lambda f: done.called or done.errback(f))
        return done

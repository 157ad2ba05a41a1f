"""Fetch small JSON documents (OIDC discovery, JWKS) over verified HTTPS.

Redirects are not followed, the body is capped while it is read, the whole
fetch (connect, headers, body) has one deadline, and the server certificate
is checked against the configured CA bundle or the system's trust store.
Nothing here blocks the reactor.
"""

import json

from OpenSSL.SSL import Error as TLSError
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import UNKNOWN_LENGTH, IPolicyForHTTPS
from zope.interface import implementer

from arc.tls import client_options


class FetchError(Exception):
    """A document could not be fetched or used; the message says why."""


@implementer(IPolicyForHTTPS)
class _Trust:
    """Verify servers against ``ca_pem`` (None: the system's trust store)."""

    def __init__(self, ca_pem):
        self._ca_pem = ca_pem

    def creatorForNetloc(self, hostname, port):
        return client_options(hostname.decode("ascii"), ca_pem=self._ca_pem)


class _CappedReader(Protocol):
    """Collects a response body of at most ``limit`` bytes.

    ``done`` fires with the body, or fails with FetchError once the
    connection is over; ``lost`` fires when the body ends, however it ends.
    """

    def __init__(self, limit, url):
        self._limit = limit
        self._url = url
        self._size = 0
        self._parts = []
        self._error = None
        self.done = Deferred(lambda d: self._stop())
        self.lost = Deferred()

    def _stop(self):
        if self.transport is not None:
            self.transport.stopProducing()

    def abort(self, error):
        """Stop reading; ``done`` fails with ``error`` once the connection is over."""
        if self._error is None and not self.done.called:
            self._error = error
            self._parts = []
            self._stop()

    def dataReceived(self, data):
        if self._error is not None or self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.abort(FetchError("%s is larger than %d bytes (max_document_size)"
                                  % (self._url, self._limit)))
            return
        self._parts.append(data)

    def connectionLost(self, reason):
        self.lost.callback(None)
        if self.done.called:
            return
        if self._error is not None:
            self.done.errback(self._error)
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(FetchError("%s: the connection broke while reading the answer"
                                         % (self._url,)))


def _tls_text(error):
    if isinstance(error, VerificationError):
        return "the certificate does not name this host"
    details = error.args[0] if error.args else None
    if isinstance(details, list):
        texts = [d[-1] for d in details if isinstance(d, tuple) and d and d[-1]]
        if texts:
            return "; ".join(texts)
    return str(error) or "certificate not trusted"


def describe(failure, url, timeout):
    """A one-line cause for a failed fetch of ``url``."""
    if failure.check(FetchError):
        return str(failure.value)
    if failure.check(CancelledError, TimeoutError):
        return "%s did not answer within %g s (fetch_timeout)" % (url, timeout)
    reasons = [failure]
    if failure.check(ResponseNeverReceived, ResponseFailed):
        reasons = failure.value.reasons or reasons
    for reason in reasons:
        if reason.check(TLSError, VerificationError):
            return ("%s: TLS handshake failed (%s); if the identity provider uses a private CA, "
                    "set ca_file to it" % (url, _tls_text(reason.value)))
        if reason.check(CancelledError, TimeoutError):
            return "%s did not answer within %g s (fetch_timeout)" % (url, timeout)
    first = reasons[0]
    if first.check(DNSLookupError):
        return "%s: the host name does not resolve" % (url,)
    if first.check(ConnectError):
        return "%s: cannot connect (%s)" % (url, first.getErrorMessage())
    return "%s: %s" % (url, first.getErrorMessage())


class DocumentFetcher:
    """GETs JSON objects from https:// URLs with treq.

    :param reactor: the reactor to connect and time out with.
    :param ca_pem: PEM CA bundle to trust, None for the system's trust store.
    :param max_size: largest body accepted, in bytes.
    :param timeout: seconds for one whole fetch.
    """

    def __init__(self, reactor, *, ca_pem=None, max_size=1024 * 1024, timeout=10.0):
        self._reactor = reactor
        self._max_size = max_size
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 2
        self._pool.retryAutomatically = False
        agent = Agent(reactor, contextFactory=_Trust(ca_pem), connectTimeout=timeout,
                      pool=self._pool)
        self._http = HTTPClient(agent)
        self._pending = set()
        self._readers = set()

    def get_json(self, url):
        """Deferred firing with the JSON object at ``url``; fails with FetchError."""
        if not url.startswith("https://"):
            return fail(FetchError("%s is not an https:// URL" % (url,)))
        d = self._http.get(url, headers={"Accept": ["application/json"]},
                           allow_redirects=False, unbuffered=True, reactor=self._reactor)
        d.addCallback(self._read, url)
        deadline = self._reactor.callLater(self._timeout, d.cancel)

        def finished(result):
            if deadline.active():
                deadline.cancel()
            return result

        def failed(failure):
            raise FetchError(describe(failure, url, self._timeout))

        d.addBoth(finished)
        d.addCallbacks(self._parse, failed, callbackArgs=(url,))
        self._pending.add(d)

        def forget(result):
            self._pending.discard(d)
            return result

        return d.addBoth(forget)

    def _read(self, response, url):
        reader = _CappedReader(self._max_size, url)
        self._readers.add(reader)
        reader.lost.addCallback(lambda _: self._readers.discard(reader))
        response.deliverBody(reader)
        if response.length is not UNKNOWN_LENGTH and response.length > self._max_size:
            reader.abort(FetchError("%s announces %d bytes, more than %d (max_document_size)"
                                    % (url, response.length, self._max_size)))
        return reader.done.addCallback(lambda body: (response, body))

    @staticmethod
    def _parse(result, url):
        response, body = result
        if 300 <= response.code < 400:
            location = response.headers.getRawHeaders(b"location", [b"?"])[0]
            raise FetchError("%s answered with a redirect (HTTP %d to %s); redirects are not "
                             "followed: configure the final URL"
                             % (url, response.code, location.decode("latin-1")[:200]))
        if response.code != 200:
            raise FetchError("%s answered HTTP %d" % (url, response.code))
        try:
            document = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise FetchError("%s did not answer with JSON" % (url,)) from None
        if not isinstance(document, dict):
            raise FetchError("%s did not answer with a JSON object" % (url,))
        return document

    def close(self):
        """Abandon fetches under way and close every connection; a Deferred."""
        for d in list(self._pending):
            d.cancel()
        waits = [reader.lost for reader in self._readers]
        waits.append(self._pool.closeCachedConnections())
        return DeferredList(waits, consumeErrors=True)

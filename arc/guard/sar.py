"""Client impersonation (``kubectl --as`` / ``--as-group``), checked by the API server.

With ``guard.allow_impersonation: true``, a caller the guard authenticated
itself (static token or OIDC) may send ``Impersonate-User``,
``Impersonate-Group``, ``Impersonate-Uid`` and ``Impersonate-Extra-*``.  The
guard never forwards those headers on trust: it asks the API server, with
its own credentials, one ``SubjectAccessReview`` per requested attribute —
the same questions kube-apiserver's impersonation filter asks — whether the
caller may ``impersonate`` it:

====================================  =================  ========================
requested                             resource           API group
====================================  =================  ========================
user ``system:serviceaccount:NS:SA``  serviceaccounts    ``""`` (namespace NS)
any other user                        users              ``""``
each group                            groups             ``""``
uid                                   uids               ``authentication.k8s.io``
each extra value                      userextras/KEY     ``authentication.k8s.io``
====================================  =================  ========================

The review's subject is the caller as the API server would see them through
the guard: user name, groups plus ``system:authenticated``, extra.  Only when
every answer is *allowed* does the request go on, and the identity headers
sent upstream are rebuilt from what was checked.  Any denial is a 403
naming each denied attribute; a review that cannot be made (unreachable API
server, the guard lacking ``create`` on subjectaccessreviews, a timeout) is
a 502 naming the cause.

Allowed answers are cached for :data:`ALLOW_TTL` seconds per (caller,
attribute), so kubectl's bursts of requests cost one review each; denials
are never cached, so a new RoleBinding counts at once and a removed one
within :data:`ALLOW_TTL`.  Identical reviews under way are shared.
"""

import json
import weakref
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.error import TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, UNKNOWN_LENGTH
from zope.interface import implementer

from arc.guard.upstream import GUARD

SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
AUTHENTICATION_GROUP = "authentication.k8s.io"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
AUTHENTICATED = "system:authenticated"
#: Seconds an "allowed" answer is reused for the same caller and attribute.
ALLOW_TTL = 10.0
#: Seconds one attempt at a review may take (connect, answer, body).
TIMEOUT = 10.0
#: Most attributes one request may ask to impersonate (each costs a review).
MAX_ATTRIBUTES = 32
#: Largest review answer read.
MAX_ANSWER = 64 * 1024
#: Cached answers kept at most.
CACHE_SIZE = 4096


class ImpersonationRefused(Exception):
    """The request may not go on; ``status`` and ``message`` for the caller.

    ``status`` is 400 (malformed impersonation headers), 403 (a review
    denied) or 502 (no review could be made).  ``requested`` is the parsed
    :class:`Requested` identity when the headers were well-formed.
    """

    def __init__(self, status, message, requested=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.requested = requested


class ReviewError(Exception):
    """A review could not be made or its answer not used; the message says why."""


@dataclass(frozen=True)
class Attribute:
    """One ``impersonate`` question: resourceAttributes and a phrase for messages."""

    resource: str
    name: str
    group: str = ""
    namespace: str = ""
    subresource: str = ""

    def resource_attributes(self):
        out = {"verb": "impersonate", "resource": self.resource, "name": self.name,
               "group": self.group}
        if self.namespace:
            out["namespace"] = self.namespace
        if self.subresource:
            out["subresource"] = self.subresource
        return out

    def describe(self):
        if self.resource == "serviceaccounts":
            return "service account %r" % ("%s/%s" % (self.namespace, self.name),)
        if self.resource == "userextras":
            return "extra %r value %r" % (self.subresource, self.name)
        return "%s %r" % ({"users": "user", "groups": "group", "uids": "uid"}[self.resource],
                          self.name)


@dataclass(frozen=True)
class Requested:
    """The identity a caller asked to act as (from its ``Impersonate-*`` headers).

    ``extra`` is a tuple of ``(key, (value, ...))`` with keys lower-case and
    percent-decoded, as the API server reads them.
    """

    user: str
    groups: tuple = ()
    uid: str = ""
    extra: tuple = ()

    def attributes(self):
        """Every :class:`Attribute` the API server would check, in its order."""
        out = [_user_attribute(self.user)]
        out.extend(Attribute("groups", g) for g in self.groups)
        for key, values in self.extra:
            out.extend(Attribute("userextras", v, AUTHENTICATION_GROUP, subresource=key)
                       for v in values)
        if self.uid:
            out.append(Attribute("uids", self.uid, AUTHENTICATION_GROUP))
        return out

    def headers(self):
        """The identity headers to send upstream, rebuilt from what was checked."""
        out = [["Impersonate-User", self.user]]
        out.extend(["Impersonate-Group", g] for g in self.groups)
        if self.uid:
            out.append(["Impersonate-Uid", self.uid])
        for key, values in self.extra:
            out.extend(["Impersonate-Extra-" + quote(key, safe=""), v] for v in values)
        return out


def _user_attribute(user):
    if user.startswith(SERVICE_ACCOUNT_PREFIX):
        namespace, sep, name = user[len(SERVICE_ACCOUNT_PREFIX):].partition(":")
        if sep and namespace and name and ":" not in name:
            return Attribute("serviceaccounts", name, namespace=namespace)
    return Attribute("users", user)


def parse_requested(impersonation):
    """A :class:`Requested` from the client's ``(lower-case name, value)`` pairs.

    Raises :class:`ImpersonationRefused` (400) for what the API server would
    refuse too (groups, uid or extra without a user; a repeated user or uid;
    a malformed extra key) and for more than :data:`MAX_ATTRIBUTES` attributes.
    """
    users, groups, uids, extra = [], [], [], {}
    for name, value in impersonation:
        if name == "impersonate-user":
            users.append(value)
        elif name == "impersonate-group":
            groups.append(value)
        elif name == "impersonate-uid":
            uids.append(value)
        elif name.startswith("impersonate-extra-"):
            encoded = name[len("impersonate-extra-"):]
            key = unquote(encoded, errors="strict") if _valid_escapes(encoded) else None
            if not key:
                raise ImpersonationRefused(400, "malformed header %s: the extra key after "
                                                "Impersonate-Extra- must be a non-empty, "
                                                "percent-encoded key" % (name,))
            extra.setdefault(key.lower(), []).append(value)
        else:
            raise ImpersonationRefused(400, "unknown impersonation header %s: send only "
                                            "Impersonate-User, -Group, -Uid and -Extra-KEY"
                                            % (name,))
    if len(users) != 1 or not users[0]:
        raise ImpersonationRefused(400, "impersonation needs exactly one non-empty "
                                        "Impersonate-User (kubectl --as=USER) besides any "
                                        "--as-group, --as-uid or extra")
    if len(uids) > 1:
        raise ImpersonationRefused(400, "more than one Impersonate-Uid header")
    requested = Requested(users[0], tuple(groups), uids[0] if uids else "",
                          tuple((k, tuple(v)) for k, v in sorted(extra.items())))
    if len(requested.attributes()) > MAX_ATTRIBUTES:
        raise ImpersonationRefused(400, "impersonation asks for more than %d user, group, uid "
                                        "and extra values; ask for fewer" % (MAX_ATTRIBUTES,))
    return requested


def _valid_escapes(text):
    """True when every ``%`` in ``text`` starts a two-digit hex escape."""
    i = text.find("%")
    while i >= 0:
        pair = text[i + 1:i + 3]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            return False
        i = text.find("%", i + 3)
    return True


def review_body(principal, attribute):
    """The ``SubjectAccessReview`` asking whether ``principal`` may impersonate ``attribute``."""
    groups = list(principal.groups)
    if AUTHENTICATED not in groups:
        groups.append(AUTHENTICATED)
    spec = {"user": principal.username, "groups": groups,
            "resourceAttributes": attribute.resource_attributes()}
    if principal.extra:
        spec["extra"] = {key: list(values) for key, values in sorted(principal.extra.items())}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": spec}


@implementer(IBodyProducer)
class _Body:
    """A request body known in full (no cooperator, no reactor turn)."""

    def __init__(self, data):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _Endpoint:
    """An IStreamClientEndpoint dialing the API server with the guard's credentials."""

    def __init__(self, upstream):
        self._upstream = upstream

    def connect(self, factory):
        return self._upstream.connect(GUARD, factory)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    def __init__(self, upstream):
        self._endpoint = _Endpoint(upstream)

    def endpointForURI(self, uri):
        return self._endpoint


class _AnswerReader(Protocol):
    """Collects an answer body of at most :data:`MAX_ANSWER` bytes into ``done``."""

    def __init__(self):
        self._parts = []
        self._size = 0
        self.done = Deferred(lambda d: self._stop())

    def _stop(self):
        if self.transport is not None:
            self.transport.stopProducing()

    def abort(self, error):
        """Stop reading; ``done`` fails with ``error``."""
        if not self.done.called:
            self._parts = []
            self.done.errback(error)
        self._stop()

    def dataReceived(self, data):
        if self.done.called:
            return
        self._size += len(data)
        if self._size > MAX_ANSWER:
            self.abort(ReviewError("its answer is larger than %d bytes" % (MAX_ANSWER,)))
            return
        self._parts.append(data)

    def connectionLost(self, reason):
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


_RETRIED = (ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent)


def _reasons(failure):
    """``failure`` and, for the web client's wrapper exceptions, what they wrap."""
    if failure.check(ResponseNeverReceived, RequestTransmissionFailed):
        return [failure] + list(failure.value.reasons)
    return [failure]


def _timed_out(failure):
    return any(f.check(TimeoutError, CancelledError) for f in _reasons(failure))


class ImpersonationChecker:
    """Asks the API server ``SubjectAccessReview`` questions for one guard.

    :param upstream: an :class:`~arc.guard.upstream.APIServer` (``connect``,
        ``credential_headers``, ``describe``).
    :param reactor: for connections, the timeout and the cache's clock.
    """

    log = Logger()

    def __init__(self, upstream, reactor, *, timeout=TIMEOUT, allow_ttl=ALLOW_TTL):
        self.upstream = upstream
        self.reactor = reactor
        self.timeout = timeout
        self.allow_ttl = allow_ttl
        parts = urlsplit(upstream.describe())
        self.url = ("https://%s%s" % (parts.netloc, SAR_PATH)).encode("ascii")
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.cachedConnectionTimeout = 30
        self._agent = Agent.usingEndpointFactory(reactor, _EndpointFactory(upstream), self._pool)
        self._allowed = {}      # key -> expiry (reactor seconds)
        self._asking = {}       # key -> [Deferred, ...] waiting for a review under way

    def check(self, principal, impersonation):
        """Deferred firing with the :class:`Requested` identity once every review allows it.

        Fails with :class:`ImpersonationRefused` when the headers are
        malformed (400), a review denies (403) or none can be made (502).
        """
        try:
            requested = parse_requested(impersonation)
        except ImpersonationRefused as e:
            return fail(e)
        attributes = requested.attributes()
        answers = [self.ask(principal, a) for a in attributes]
        d = DeferredList(answers, consumeErrors=True)
        d.addCallback(self._verdict, principal, requested, attributes)
        return d

    def _verdict(self, results, principal, requested, attributes):
        denied, broken = [], []
        for (ok, value), attribute in zip(results, attributes):
            if not ok:
                broken.append(value.getErrorMessage())
            elif not value[0]:
                denied.append((attribute, value[1]))
        if broken:
            raise ImpersonationRefused(502, "cannot check whether %r may impersonate %r: %s"
                                       % (principal.username, requested.user, broken[0]),
                                       requested)
        if denied:
            what = ", ".join(a.describe() for a, _ in denied)
            reasons = sorted({r for _, r in denied if r})
            raise ImpersonationRefused(
                403, "user %r may not impersonate %s (denied by the API server's "
                     "SubjectAccessReview%s); an administrator can grant verb 'impersonate' "
                     "on them with RBAC" % (principal.username, what,
                                            ": " + "; ".join(reasons) if reasons else ""),
                requested)
        return requested

    # -- one review --------------------------------------------------------------

    def ask(self, principal, attribute):
        """Deferred firing with ``(allowed, reason)`` for one attribute."""
        key = (principal.username, tuple(principal.groups),
               tuple(sorted((k, tuple(v)) for k, v in principal.extra.items())), attribute)
        expiry = self._allowed.get(key)
        if expiry is not None:
            if expiry > self.reactor.seconds():
                return succeed((True, ""))
            del self._allowed[key]
        waiter = Deferred()
        if key in self._asking:
            self._asking[key].append(waiter)
            return waiter
        self._asking[key] = [waiter]
        body = json.dumps(review_body(principal, attribute)).encode("utf-8")
        d = self._post(body, retry=True)
        d.addCallback(self._answer)
        d.addBoth(self._settle, key)
        return waiter

    def _settle(self, result, key):
        waiters = self._asking.pop(key, [])
        if not isinstance(result, tuple):
            self.log.warn("guard cannot make a SubjectAccessReview: {error}",
                          error=result.getErrorMessage())
        elif result[0]:
            self._remember(key)
        for waiter in waiters:
            if isinstance(result, tuple):
                waiter.callback(result)
            else:
                waiter.errback(result)

    def _remember(self, key):
        self._allowed[key] = self.reactor.seconds() + self.allow_ttl
        if len(self._allowed) > CACHE_SIZE:
            now = self.reactor.seconds()
            for old in [k for k, t in self._allowed.items() if t <= now]:
                del self._allowed[old]
            while len(self._allowed) > CACHE_SIZE:
                del self._allowed[next(iter(self._allowed))]

    def _post(self, body, retry):
        headers = Headers({b"Content-Type": [b"application/json"],
                           b"Accept": [b"application/json"],
                           b"User-Agent": [b"arc-guard"]})
        for name, value in self.upstream.credential_headers():
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        d = self._agent.request(b"POST", self.url, headers, _Body(body))
        d.addCallback(self._read)
        timer = self.reactor.callLater(self.timeout, d.cancel)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        def failed(failure):
            if retry and failure.check(*_RETRIED) and not _timed_out(failure):
                # A kept-alive connection the API server had just closed: once more.
                return self._post(body, retry=False)
            raise ReviewError(self._describe(failure))

        d.addBoth(done)
        d.addErrback(failed)
        return d

    def _read(self, response):
        reader = _AnswerReader()
        response.deliverBody(reader)
        if response.length is not UNKNOWN_LENGTH and response.length > MAX_ANSWER:
            reader.abort(ReviewError("its answer announces %d bytes, more than %d"
                                     % (response.length, MAX_ANSWER)))
        return reader.done.addCallback(lambda body: (response.code, body))

    def _describe(self, failure):
        server = self.upstream.describe()
        if _timed_out(failure):
            return "the API server %s did not answer a SubjectAccessReview within %g s" % (
                server, self.timeout)
        return "the API server %s could not be asked: %s" % (
            server, _reasons(failure)[-1].getErrorMessage())

    def _answer(self, result):
        code, body = result
        server = self.upstream.describe()
        if code in (401, 403):
            fix = ("the guard's own credentials (upstream) were not accepted; check its token "
                   "or client certificate" if code == 401 else
                   "grant the guard's account 'create' on subjectaccessreviews."
                   "authorization.k8s.io (etc/rbac/guard.yaml), or turn allow_impersonation off")
            raise ReviewError("the API server %s refused the guard's SubjectAccessReview "
                              "(HTTP %d): %s" % (server, code, fix))
        if code not in (200, 201):
            raise ReviewError("the API server %s answered the guard's SubjectAccessReview "
                              "with HTTP %d" % (server, code))
        try:
            status = json.loads(body.decode("utf-8"))["status"]
            allowed = status.get("allowed") is True and status.get("denied") is not True
            reason = status.get("reason") or status.get("evaluationError") or ""
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ReviewError("the API server %s answered the guard's SubjectAccessReview "
                              "with no status.allowed" % (server,)) from None
        return bool(allowed), str(reason)[:300]

    def close(self):
        """Close kept-alive connections; a Deferred."""
        return self._pool.closeCachedConnections()


_checkers = weakref.WeakKeyDictionary()


def checker_for(guard):
    """The :class:`ImpersonationChecker` of ``guard`` (made on first use, then shared).

    One per guard, so every connection of a guard shares its cache and its
    kept-alive connection to the API server.
    """
    checker = _checkers.get(guard)
    if checker is None:
        reactor = getattr(guard.upstream, "reactor", None)
        if reactor is None:
            from twisted.internet import reactor
        checker = _checkers[guard] = ImpersonationChecker(guard.upstream, reactor)
    return checker


def check_impersonation(guard, principal, impersonation):
    """Shortcut: ``checker_for(guard).check(principal, impersonation)``."""
    return checker_for(guard).check(principal, impersonation)


def close_checker(guard):
    """Close the kept-alive connections of ``guard``'s checker, if it has one; a Deferred."""
    checker = _checkers.pop(guard, None)
    return checker.close() if checker is not None else succeed(None)

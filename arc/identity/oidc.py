"""One OpenID Connect issuer: its signing keys, and verification of its ID tokens.

:class:`OIDCIssuer` fetches ``<issuer>/.well-known/openid-configuration``
and the JWKS it names (see :mod:`arc.identity.fetch`), keeps the last good
key set, refreshes it every ``jwks_refresh`` seconds (run :meth:`service`
in the owner's MultiService), and refetches at most once per
``kid_refetch_interval`` when a token names a key it does not know; callers
arriving while a fetch is under way share it.  When the identity provider is
unreachable the last good keys keep working and the failure is logged once,
then at most once per ``jwks_refresh``.

Verification (:meth:`OIDCIssuer.authenticate`) refuses before any key lookup
what is not a three-part JWS, unsigned and HMAC tokens, algorithms off the
allow-list and tokens from another issuer; then PyJWT checks the signature
with the one algorithm the token names (on the allow-list and fitting the
key), ``iss``, ``aud`` and the presence of ``exp``, ``iat``, ``sub``; times
are checked against the injected clock with 60 s of skew; finally the
claims are mapped to a :class:`~arc.identity.model.Principal`.
"""

import jwt
from jwt import exceptions as jwterr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from arc.identity.claims import check_times, principal_from_claims
from arc.identity.fetch import DocumentFetcher, FetchError
from arc.identity.jwks import KeySet, KeySetError
from arc.identity.jws import check_algorithm, looks_like_jwt, parse_compact, unverified_issuer
from arc.identity.model import AuthError, shorten
from arc.identity.settings import IssuerSettings, https_url_problem, parse_issuer

__all__ = ["OIDCIssuer", "IssuerSettings", "parse_issuer", "looks_like_jwt",
           "unverified_issuer"]

_REQUIRED = ["exp", "iat", "sub", "iss", "aud"]


class OIDCIssuer:
    """Verifies ID tokens of one issuer.

    :param settings: an :class:`~arc.identity.settings.IssuerSettings`.
    :param reactor: reactor for HTTPS fetches (default: the global one).
    :param clock: source of time for token validity, refetch rate limiting and
        the refresh schedule (default: ``reactor``).
    :param fetcher: object with ``get_json(url)`` and ``close()`` (default: a
        :class:`~arc.identity.fetch.DocumentFetcher`).
    """

    log = Logger()

    def __init__(self, settings, *, reactor=None, clock=None, fetcher=None):
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        self.clock = clock if clock is not None else reactor
        self._fetcher = fetcher or DocumentFetcher(
            reactor, ca_pem=settings.ca_pem, max_size=settings.max_document_size,
            timeout=settings.fetch_timeout)
        self.keys = None              # the last good KeySet
        self.jwks_uri = None
        self.fetches = 0              # key set fetches started (discovery + JWKS)
        self.last_error = None        # reason of the last failed fetch, None after success
        self._inflight = None
        self._waiters = []
        self._last_forced = None
        self._failing_since = None
        self._last_logged = None
        self._stopping = False

    @property
    def issuer(self):
        return self.settings.issuer

    # -- key set ---------------------------------------------------------------

    def refresh(self):
        """Fetch discovery and JWKS now, or join the fetch under way.

        Returns a Deferred that never fails: it fires with None once a key set
        was installed, or with the reason (a string) the fetch failed.
        """
        waiter = Deferred()
        self._waiters.append(waiter)
        if self._inflight is None:
            self.fetches += 1
            self._inflight = maybeDeferred(self._fetch)
            self._inflight.addBoth(self._fetched)
        return waiter

    def _fetch(self):
        d = self._fetcher.get_json(self.settings.discovery_url)
        d.addCallback(self._discovered)
        d.addCallback(self._fetcher.get_json)
        d.addCallback(self._parse_keys)
        return d

    def _discovered(self, document):
        url = self.settings.discovery_url
        named = document.get("issuer")
        if named != self.settings.issuer:
            raise FetchError("%s names issuer %s, but the configured issuer is %r; they must "
                             "match exactly (check the path and any trailing slash)"
                             % (url, shorten(named), self.settings.issuer))
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or https_url_problem(jwks_uri.split("?")[0]):
            raise FetchError("%s gives no https:// jwks_uri (got %s)" % (url, shorten(jwks_uri)))
        self.jwks_uri = jwks_uri
        return jwks_uri

    def _parse_keys(self, document):
        try:
            return KeySet.parse(document, self.settings.algorithms)
        except KeySetError as e:
            raise FetchError("%s: %s" % (self.jwks_uri, e)) from None

    def _fetched(self, result):
        self._inflight = None
        if isinstance(result, Failure):
            outcome = (str(result.value) if result.check(FetchError)
                       else "unexpected error: %s" % (result.getErrorMessage(),))
            if not result.check(FetchError):
                self.log.failure("key set fetch for {issuer} failed", result,
                                 issuer=self.issuer)
            self._note_failure(outcome)
        else:
            outcome = None
            self._install(result)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(outcome)

    def _install(self, keys):
        now = self.clock.seconds()
        old = None if self.keys is None else sorted(map(str, self.keys.kids()))
        if self.keys is None:
            # The first key set is a load, not a refetch: a key rotated right
            # after start-up may still be fetched at once.
            self._last_forced = None
        self.keys = keys
        self.last_error = None
        if self._failing_since is not None:
            self.log.info("signing keys of {issuer} fetched again after {seconds:.0f} s of "
                          "failures", issuer=self.issuer, seconds=now - self._failing_since)
            self._failing_since = self._last_logged = None
        if old != sorted(map(str, keys.kids())):
            self.log.info("signing keys of {issuer}: {kids}", issuer=self.issuer,
                          kids=", ".join(map(str, keys.kids())))

    def _note_failure(self, reason):
        now = self.clock.seconds()
        self.last_error = reason
        if self._failing_since is None:
            self._failing_since = now
        if self._stopping:
            return
        if self._last_logged is None or now - self._last_logged >= self.settings.jwks_refresh:
            self._last_logged = now
            self.log.error("cannot fetch the signing keys of {issuer}: {reason}; {fallback}",
                           issuer=self.issuer, reason=reason,
                           fallback=("still using the last good keys" if self.keys is not None
                                     else "tokens of this issuer are refused until it answers"))

    def _refetch_for(self, kid):
        """Deferred firing when a fetch that may find ``kid`` is over (or at once)."""
        if self._inflight is not None:
            return self.refresh()
        now = self.clock.seconds()
        interval = self.settings.kid_refetch_interval
        if self._last_forced is not None and now - self._last_forced < interval:
            return succeed(self.last_error)
        self._last_forced = now
        return self.refresh()

    # -- tokens ----------------------------------------------------------------

    def authenticate(self, token):
        """Deferred firing with the token's Principal; fails with AuthError."""
        try:
            jws = parse_compact(token)
            alg = check_algorithm(jws.header, self.settings.algorithms)
            iss = jws.claims.get("iss")
            if iss != self.settings.issuer:
                raise AuthError("wrong_issuer", "the token is from issuer %s, not %s; get a "
                                                "token from the configured identity provider"
                                % (shorten(iss), self.settings.issuer))
        except AuthError:
            return fail()
        kid = jws.header.get("kid")
        if self.keys is not None and self.keys.has(kid):
            return maybeDeferred(self._verify, token, jws, alg, None)
        d = self._refetch_for(kid)
        d.addCallback(lambda outcome: self._verify(token, jws, alg, outcome))
        return d

    def _no_key(self, kid, fetch_error):
        if self.keys is None:
            return AuthError("idp_unavailable", "the signing keys of %s could not be fetched "
                                                "(%s); try again later, and check that this "
                                                "machine can reach the identity provider"
                             % (self.issuer, fetch_error or "retrying shortly"))
        where = self.jwks_uri or self.settings.discovery_url
        text = ("the token was signed with key %s, which %s does not publish at %s; the key "
                "was retired or the token comes from another environment: get a new token"
                % (shorten(kid), self.issuer, where))
        if fetch_error:
            text += " (fetching the current keys failed: %s)" % (fetch_error,)
        return AuthError("unknown_key", text)

    def _verify(self, token, jws, alg, fetch_error):
        kid = jws.header.get("kid")
        if self.keys is None or not self.keys.has(kid):
            raise self._no_key(kid, fetch_error)
        candidates = self.keys.candidates(kid, alg)
        if not candidates:
            raise AuthError("bad_algorithm", "the token says %s, which key %s of %s cannot "
                                             "verify; the token was not made by this issuer"
                            % (alg, shorten(kid), self.issuer))
        claims = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token, key=key, algorithms=[alg], audience=self.settings.client_id,
                    issuer=self.settings.issuer, leeway=self.settings.leeway,
                    options={"require": _REQUIRED, "verify_exp": False, "verify_iat": False,
                             "verify_nbf": False, "enforce_minimum_key_length": True})
                break
            except jwterr.InvalidSignatureError:
                continue
            except jwterr.PyJWTError as e:
                raise self._translate(e, jws, token) from None
        if claims is None:
            raise AuthError("bad_signature", "the token's signature does not verify with the "
                                             "keys of %s; it was altered or not issued there"
                            % (self.issuer,))
        check_times(claims, self.clock.seconds(), self.settings.leeway)
        return principal_from_claims(claims, self.settings)

    def _translate(self, error, jws, token):
        if isinstance(error, jwterr.InvalidAudienceError):
            return AuthError("wrong_audience", "the token is for audience %s, not for client_id "
                                               "%r; request the token for that client (or fix "
                                               "client_id)"
                             % (shorten(jws.claims.get("aud")), self.settings.client_id))
        if isinstance(error, jwterr.MissingRequiredClaimError):
            return AuthError("missing_claim", "the token has no %r claim; arc requires exp, "
                                              "iat, sub, iss and aud" % (error.claim,))
        if isinstance(error, jwterr.InvalidIssuerError):
            return AuthError("wrong_issuer", "the token is not from %s" % (self.issuer,))
        if isinstance(error, jwterr.InvalidAlgorithmError):
            return AuthError("bad_algorithm", "the token's algorithm does not fit the key that "
                                              "must verify it")
        if isinstance(error, jwterr.InvalidSubjectError):
            return AuthError("bad_claim", "the token's 'sub' claim is not a string")
        detail = str(error)
        if any(len(part) >= 8 and part in detail for part in token.split(".")):
            detail = type(error).__name__
        return AuthError("malformed", "the token cannot be decoded (%s)" % (shorten(detail, 120),))

    # -- lifecycle -------------------------------------------------------------

    def service(self):
        """A Service that fetches the keys at start and keeps them fresh."""
        return KeyRefreshService(self)

    def stop(self):
        """Abandon a fetch under way and close idle connections (a Deferred)."""
        self._stopping = True
        try:
            if self._inflight is not None:
                self._inflight.cancel()
        finally:
            self._stopping = False
        return self._fetcher.close()


class KeyRefreshService(Service):
    """Refreshes an issuer's keys every ``jwks_refresh`` seconds.

    After a failed fetch the next try comes after ``kid_refetch_interval``
    seconds instead, so a start-up during an identity provider outage heals
    quickly.
    """

    def __init__(self, issuer):
        self.issuer = issuer
        self.name = "oidc-keys " + issuer.issuer
        self._call = None

    def startService(self):
        super().startService()
        self._tick()

    def _tick(self):
        self._call = None
        self.issuer.refresh().addCallback(self._schedule)

    def _schedule(self, outcome):
        if not self.running:
            return
        settings = self.issuer.settings
        delay = (settings.jwks_refresh if outcome is None
                 else min(settings.kid_refetch_interval, settings.jwks_refresh))
        self._call = self.issuer.clock.callLater(delay, self._tick)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return self.issuer.stop()

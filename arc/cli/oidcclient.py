"""The command line's side of OpenID Connect: discovery and the token endpoint.

Plain blocking HTTPS (the CLI is not a server): every request verifies the
server's certificate (against ``--ca-file`` only when given, else the
system's trust store), follows no redirect, reads at most
:data:`MAX_DOCUMENT` bytes and gives up after ``timeout`` seconds of
silence.  Proxies named by ``$HTTPS_PROXY``/``$NO_PROXY`` are honoured.

The grants (RFC 6749, RFC 8628, RFC 7636):

- :func:`poll_device` polls for a device authorization,
- :meth:`Provider.exchange_code` redeems an authorization code with its PKCE
  verifier,
- :meth:`Provider.refresh` uses a refresh token.

ID tokens received from the token endpoint are checked for ``iss``, ``aud``,
``exp`` and ``nonce``; their signatures are left to the relay and the guard,
which verify every request (OpenID Connect Core 3.1.3.7 allows a client to
rely on the TLS-verified token endpoint instead).  Nothing here prints or
logs a token.
"""

import base64
import hashlib
import http.client
import json
import secrets
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

from arc.cli.tokencache import jwt_claims

MAX_DOCUMENT = 1024 * 1024
TIMEOUT = 15.0
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SLOW_DOWN_STEP = 5


class OIDCError(Exception):
    """The identity provider could not be used; the message says why."""


class GrantError(OIDCError):
    """The token endpoint refused a grant (an OAuth ``error`` answer)."""

    def __init__(self, error, description=None):
        self.error = error
        self.description = description
        text = "the identity provider refused the request (%s" % (error,)
        if description:
            text += ": %s" % (description[:200],)
        super().__init__(text + ")")


# -- PKCE ------------------------------------------------------------------------


def pkce_pair():
    """``(verifier, challenge)`` for PKCE with ``S256`` (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    return verifier, pkce_challenge(verifier)


def pkce_challenge(verifier):
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# -- HTTP ------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _reason_text(url, reason, timeout):
    if isinstance(reason, ssl.SSLCertVerificationError):
        return ("%s: the server's certificate is not trusted (%s); if the identity provider "
                "uses a private CA, pass --ca-file" % (url, reason.verify_message or reason))
    if isinstance(reason, ssl.SSLError):
        return "%s: TLS handshake failed (%s)" % (url, reason.reason or reason)
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "%s did not answer within %g s" % (url, timeout)
    if isinstance(reason, socket.gaierror):
        return "%s: the host name does not resolve" % (url,)
    if isinstance(reason, ConnectionRefusedError):
        return "%s: cannot connect (connection refused)" % (url,)
    if isinstance(reason, OSError):
        return "%s: cannot connect (%s)" % (url, reason.strerror or reason)
    return "%s: %s" % (url, reason)


class Provider:
    """One identity provider, found from its issuer URL.

    :param issuer: the issuer URL (exactly as in the tokens' ``iss``).
    :param ca_file: PEM bundle to trust instead of the system's trust store.
    """

    def __init__(self, issuer, *, ca_file=None, timeout=TIMEOUT, max_size=MAX_DOCUMENT):
        if urllib.parse.urlsplit(issuer).scheme != "https":
            raise OIDCError("the issuer must be an https:// URL, not %r" % (issuer,))
        self.issuer = issuer
        self.timeout = timeout
        self.max_size = max_size
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise OIDCError("cannot use the CA bundle %s: %s"
                            % (ca_file, getattr(e, "strerror", None) or e)) from None
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                                   _NoRedirect())
        self._metadata = None

    # -- transport ---------------------------------------------------------------

    def _open(self, url, data=None):
        """``(status, parsed JSON object)`` of a GET (or a form POST with ``data``)."""
        if urllib.parse.urlsplit(url).scheme != "https":
            raise OIDCError("%s is not an https:// URL; the identity provider's endpoints "
                            "must use TLS" % (url,))
        headers = {"Accept": "application/json"}
        body = None
        if data is not None:
            body = urllib.parse.urlencode(data).encode("ascii")
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        request = urllib.request.Request(url, data=body, headers=headers,
                                         method="POST" if body is not None else "GET")
        try:
            try:
                response = self._opener.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                response = e
            with response:
                status = response.status if hasattr(response, "status") else response.code
                if 300 <= status < 400:
                    location = response.headers.get("Location", "?")
                    raise OIDCError("%s answered with a redirect (HTTP %d to %s); redirects are "
                                    "not followed: configure the final URL"
                                    % (url, status, location[:200]))
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.max_size:
                    raise OIDCError("%s announces %s bytes, more than %d" % (url, length,
                                                                             self.max_size))
                raw = response.read(self.max_size + 1)
        except urllib.error.URLError as e:
            raise OIDCError(_reason_text(url, e.reason, self.timeout)) from None
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, (socket.timeout, TimeoutError)):
                raise OIDCError(_reason_text(url, e, self.timeout)) from None
            raise OIDCError("%s: the connection broke (%s)" % (url, e)) from None
        if len(raw) > self.max_size:
            raise OIDCError("%s answered more than %d bytes" % (url, self.max_size))
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            value = None
        if not isinstance(value, dict):
            raise OIDCError("%s answered HTTP %d without a JSON object" % (url, status))
        return status, value

    # -- discovery ---------------------------------------------------------------

    def metadata(self):
        """The discovery document (fetched once)."""
        if self._metadata is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            status, document = self._open(url)
            if status != 200:
                raise OIDCError("%s answered HTTP %d; is the issuer URL right?" % (url, status))
            if document.get("issuer") != self.issuer:
                raise OIDCError("the discovery document at %s names the issuer %r; use exactly "
                                "that as --issuer" % (url, document.get("issuer")))
            self._metadata = document
        return self._metadata

    def endpoint(self, key):
        """The URL of ``key`` (e.g. ``token_endpoint``) from discovery, or None."""
        url = self.metadata().get(key)
        return url if isinstance(url, str) and url else None

    def require(self, key, what):
        url = self.endpoint(key)
        if url is None:
            raise OIDCError("the identity provider %s does not offer %s (no %s in its "
                            "discovery document)" % (self.issuer, what, key))
        return url

    def default_scopes(self, wanted):
        """``wanted`` (a space-separated string) without scopes the provider says it lacks.

        ``openid`` is always kept; when discovery lists no ``scopes_supported``
        every wanted scope is kept.
        """
        supported = self.metadata().get("scopes_supported")
        names = wanted.split()
        if isinstance(supported, list) and supported:
            names = [s for s in names if s == "openid" or s in supported]
        return " ".join(names)

    # -- the token endpoint ------------------------------------------------------

    def token_request(self, fields):
        """POST ``fields`` to the token endpoint; the answer, or GrantError/OIDCError."""
        url = self.require("token_endpoint", "a token endpoint")
        status, answer = self._open(url, fields)
        error = answer.get("error")
        if isinstance(error, str) and error:
            description = answer.get("error_description")
            raise GrantError(error, description if isinstance(description, str) else None)
        if status != 200:
            raise OIDCError("%s answered HTTP %d" % (url, status))
        return answer

    def check_id_token(self, answer, client_id, nonce=None):
        """The ID token of a token response, after checking its claims."""
        token = answer.get("id_token")
        if not isinstance(token, str) or not token:
            raise OIDCError("the identity provider returned no ID token; the scopes must "
                            "include openid")
        claims = jwt_claims(token)
        if claims is None:
            raise OIDCError("the identity provider returned an ID token that is not a JWT")
        if claims.get("iss") != self.issuer:
            raise OIDCError("the ID token was issued by %r, not %s" % (claims.get("iss"),
                                                                       self.issuer))
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if client_id not in audiences:
            raise OIDCError("the ID token is not meant for client %s (aud %r)"
                            % (client_id, audience))
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise OIDCError("the ID token has no expiry (exp)")
        if nonce is not None and claims.get("nonce") != nonce:
            raise OIDCError("the ID token does not carry this login's nonce; try again")
        return token

    def exchange_code(self, client_id, code, redirect_uri, verifier):
        """Redeem an authorization code (with its PKCE verifier); the token response."""
        return self.token_request({"grant_type": "authorization_code", "code": code,
                                   "redirect_uri": redirect_uri, "client_id": client_id,
                                   "code_verifier": verifier})

    def refresh(self, client_id, refresh_token, scopes=None):
        """Use a refresh token; the token response."""
        fields = {"grant_type": "refresh_token", "refresh_token": refresh_token,
                  "client_id": client_id}
        if scopes:
            fields["scope"] = scopes
        return self.token_request(fields)

    def start_device(self, client_id, scopes):
        """Ask for a device authorization (RFC 8628 3.1); a :class:`DeviceAuthorization`."""
        url = self.require("device_authorization_endpoint", "the device authorization grant")
        status, answer = self._open(url, {"client_id": client_id, "scope": scopes})
        if "error" in answer:
            raise GrantError(str(answer["error"]), answer.get("error_description"))
        if status != 200:
            raise OIDCError("%s answered HTTP %d" % (url, status))
        return DeviceAuthorization.from_answer(answer, url)


class DeviceAuthorization:
    """What the device authorization endpoint answered."""

    def __init__(self, device_code, user_code, verification_uri, complete_uri, expires_in,
                 interval):
        self.device_code = device_code
        self.user_code = user_code
        self.verification_uri = verification_uri
        self.complete_uri = complete_uri
        self.expires_in = expires_in
        self.interval = interval

    @classmethod
    def from_answer(cls, answer, url):
        device_code = answer.get("device_code")
        user_code = answer.get("user_code")
        # Some providers spell it verification_url.
        uri = answer.get("verification_uri") or answer.get("verification_url")
        if not all(isinstance(v, str) and v for v in (device_code, user_code, uri)):
            raise OIDCError("%s answered without device_code, user_code and verification_uri"
                            % (url,))
        complete = answer.get("verification_uri_complete")
        expires_in = answer.get("expires_in")
        interval = answer.get("interval", 5)
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
            expires_in = 600
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval < 0:
            interval = 5
        return cls(device_code, user_code, uri, complete if isinstance(complete, str) else None,
                   float(expires_in), float(interval))


def poll_device(provider, client_id, device, *, sleep=time.sleep, clock=time.monotonic):
    """Poll the token endpoint until the device authorization is approved.

    Waits ``interval`` seconds before each poll, five more after every
    ``slow_down`` (RFC 8628 3.5), keeps polling on ``authorization_pending``
    and gives up when ``expires_in`` has passed.  Returns the token response;
    raises OIDCError with the reason otherwise.
    """
    interval = device.interval
    deadline = clock() + device.expires_in
    fields = {"grant_type": DEVICE_GRANT, "device_code": device.device_code,
              "client_id": client_id}
    while True:
        if clock() + interval > deadline:
            raise OIDCError("the login code expired (after %d s) before it was approved; run "
                            "the login again and approve it sooner" % (device.expires_in,))
        sleep(interval)
        try:
            return provider.token_request(fields)
        except GrantError as e:
            if e.error == "authorization_pending":
                continue
            if e.error == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if e.error == "expired_token":
                raise OIDCError("the login code expired before it was approved; run the login "
                                "again and approve it sooner") from None
            if e.error == "access_denied":
                raise OIDCError("the login was refused at the identity provider "
                                "(access_denied)") from None
            raise

"""A real OpenID Connect issuer on loopback, for tests.

It serves over HTTPS (a certificate from :mod:`arc.pki` for 127.0.0.1, ::1
and localhost) the discovery document and the JWKS of one issuer, and mints
ID tokens with its keys (RSA ``RS256`` and EC ``ES256`` by default).  Tests
can rotate keys, count JWKS fetches, make every endpoint fail as an
identity provider that is down would, or replace one endpoint's answer.

In-process, in the test's own reactor::

    server = OIDCIssuerServer()
    url = yield server.start()          # https://127.0.0.1:PORT/realm
    token = server.mint({"sub": "alice", "aud": "arc", "groups": ["dev"]})
    # server.ca_pem, server.jwks_fetches, server.failing = True, server.rotate()
    yield server.stop()

From another process::

    python -m arc.testing.oidc --state-dir DIR [--listen tcp:0:interface=127.0.0.1]
    python -m arc.testing.oidc --state-dir DIR mint --sub alice --groups dev,ops \\
        --aud arc --ttl 3600

The server writes ``DIR/ca.crt``, its keys (``DIR/keys.json``) and, once
listening, ``DIR/url`` (last), prints ``oidc issuer listening on URL`` and
runs until SIGTERM.  ``mint`` reads the keys and the URL from DIR and prints
one token.

More endpoints (device code, authorization code with PKCE, token and
refresh) are added with :meth:`OIDCIssuerServer.add_endpoint`, which also
records them in the discovery document.  :meth:`OIDCIssuerServer.enable_login`
adds those of :class:`LoginFlows`, which approve one test user by itself::

    flows = server.enable_login(client_id="arc", claims={"sub": "alice"}, ttl=300,
                                pending=2, slow_down=True)
    # flows.grants, flows.revoke_refresh_tokens(), flows.approve = False

(``--login-client-id arc --login-sub alice --login-groups dev`` on the
command line.)
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from urllib.parse import urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from arc import pki
from arc.tls import server_options

DEFAULT_LISTEN = "tcp:0:interface=127.0.0.1"
DISCOVERY = "discovery"
JWKS = "jwks"
DEVICE = "device"
AUTHORIZE = "authorize"
TOKEN = "token"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_HASHES = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}


# -- keys and tokens -------------------------------------------------------------


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_b64(value):
    return _b64(json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8"))


class SigningKey:
    """One private key of the issuer, with its ``kid`` and algorithm."""

    def __init__(self, kid, alg, private_key):
        self.kid = kid
        self.alg = alg
        self.private_key = private_key

    @classmethod
    def generate(cls, kid, alg="RS256"):
        if alg.startswith(("RS", "PS")):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        elif alg == "ES384":
            key = ec.generate_private_key(ec.SECP384R1())
        else:
            raise ValueError("no key type for %s" % (alg,))
        return cls(kid, alg, key)

    def public_pem(self):
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def private_pem(self):
        return pki.key_pem(self.private_key)

    def jwk(self):
        """The public JWK as published in the JWKS."""
        family = ECAlgorithm if self.alg.startswith("ES") else RSAAlgorithm
        jwk = family.to_jwk(self.private_key.public_key(), as_dict=True)
        jwk.update(kid=self.kid, alg=self.alg, use="sig")
        return jwk

    def to_dict(self):
        return {"kid": self.kid, "alg": self.alg, "pem": self.private_pem().decode("ascii")}

    @classmethod
    def from_dict(cls, data):
        key = serialization.load_pem_private_key(data["pem"].encode("ascii"), None)
        return cls(data["kid"], data["alg"], key)


def sign(claims, *, alg, key, headers):
    """A compact JWS of ``claims``; ``alg`` may be ``none`` or HS* for attack tests.

    ``key`` is a private key object for asymmetric algorithms, bytes or str
    (any secret, e.g. a public key PEM) for HS*, ignored for ``none``.
    """
    header = {"alg": alg, "typ": "JWT"}
    header.update(headers)
    header = {k: v for k, v in header.items() if v is not None}
    if alg.lower() == "none" or alg.upper().startswith("HS"):
        signing_input = _json_b64(header) + "." + _json_b64(claims)
        if alg.lower() == "none":
            return signing_input + "."
        secret = key.encode("utf-8") if isinstance(key, str) else key
        digest = hmac.new(secret, signing_input.encode("ascii"), _HASHES[alg[2:]]).digest()
        return signing_input + "." + _b64(digest)
    extra = {k: v for k, v in header.items() if k not in ("alg",)}
    return jwt.encode(claims, key, algorithm=alg, headers=extra)


class KeyRing:
    """The issuer's keys: published ones, retired ones, and the current key per algorithm.

    Saved to ``path`` (JSON, mode 0600) after every change when ``path`` is given.
    """

    def __init__(self, path=None):
        self.path = path
        self.keys = []
        self.retired = []
        self.current = {}
        self._counter = 0

    @classmethod
    def load(cls, path):
        """The ring saved at ``path``, or None if there is none."""
        if not os.path.exists(path):
            return None
        with open(path, "r", encoding="utf-8") as f:
            state = json.load(f)
        ring = cls(path)
        ring.keys = [SigningKey.from_dict(k) for k in state["keys"]]
        ring.current = dict(state["current"])
        ring._counter = state.get("counter", len(ring.keys))
        return ring

    def _save(self):
        if self.path is None:
            return
        state = {"keys": [k.to_dict() for k in self.keys], "current": self.current,
                 "counter": self._counter}
        pki.write_private(self.path, json.dumps(state).encode("utf-8"))

    def key(self, kid=None, alg="RS256"):
        """The key with ``kid`` (published or retired), else the current key for ``alg``."""
        if kid is None:
            kid = self.current.get(alg)
        for key in self.keys + self.retired:
            if key.kid == kid:
                return key
        raise KeyError("no key %r (algorithm %s)" % (kid, alg))

    def add(self, alg="RS256", kid=None, current=True):
        """Create and publish a key; with ``current`` it signs new ``alg`` tokens."""
        self._counter += 1
        kid = kid or "%s-%d" % (alg.lower(), self._counter)
        self.keys.append(SigningKey.generate(kid, alg))
        if current:
            self.current[alg] = kid
        self._save()
        return kid

    def retire(self, kid):
        """Remove ``kid`` from the JWKS (it can still sign, for tests)."""
        key = self.key(kid)
        self.keys = [k for k in self.keys if k.kid != kid]
        self.retired.append(key)
        self.current = {alg: c for alg, c in self.current.items() if c != kid}
        self._save()

    def mint(self, issuer, now, claims=None, kid=None, alg="RS256", key=None, headers=None,
             ttl=3600):
        """See :meth:`OIDCIssuerServer.mint`; ``now`` is seconds since 1970."""
        now = int(now)
        payload = {"iss": issuer, "iat": now, "exp": now + ttl}
        payload.update(claims or {})
        payload = {k: v for k, v in payload.items() if v is not None}
        if key is None and alg.lower() != "none" and not alg.upper().startswith("HS"):
            signer = self.key(kid, alg)
            key, kid = signer.private_key, signer.kid
        header = {"kid": kid}
        header.update(headers or {})
        return sign(payload, alg=alg, key=key, headers=header)


# -- HTTP ------------------------------------------------------------------------


class Endpoint(Resource):
    """One endpoint of the issuer: counted, able to fail, able to be overridden.

    Subclasses implement :meth:`answer` returning ``(status, JSON value)``.
    """

    isLeaf = True

    def __init__(self, server, name):
        super().__init__()
        self.owner = server
        self.name = name

    def render(self, request):
        server = self.owner
        server.requests[self.name] = server.requests.get(self.name, 0) + 1
        override = server.overrides.get(self.name)
        if server.failing:
            status, headers, body = 503, {}, b'{"error":"temporarily_unavailable"}'
        elif override is not None:
            status, headers, body = override
        else:
            status, value = self.answer(request)
            headers, body = {}, json.dumps(value).encode("utf-8")
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        for name, value in headers.items():
            request.setHeader(name.encode("ascii"), value.encode("latin-1"))
        return body

    def answer(self, request):
        raise NotImplementedError


class DiscoveryEndpoint(Endpoint):
    def answer(self, request):
        return 200, self.owner.discovery_document()


class JWKSEndpoint(Endpoint):
    def answer(self, request):
        return 200, {"keys": [key.jwk() for key in self.owner.published()]}


class _Channel(HTTPChannel):
    """HTTP/1.1 channel the site keeps track of, so stopping can wait for it."""

    def connectionMade(self):
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason):
        self.site.channels.discard(self)
        super().connectionLost(reason)
        self.site.channel_gone()


class _Site(Site):
    noisy = False
    protocol = _Channel

    def __init__(self, resource):
        super().__init__(resource)
        self.channels = set()
        self._drained = []

    def log(self, request):
        pass

    def channel_gone(self):
        if not self.channels:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def close_all(self):
        """Close every connection; a Deferred firing when all are gone."""
        if not self.channels:
            return succeed(None)
        d = Deferred()
        self._drained.append(d)
        for channel in list(self.channels):
            channel.transport.loseConnection()
        return d


# -- the issuer ------------------------------------------------------------------


class OIDCIssuerServer:
    """An HTTPS OIDC issuer at ``https://HOST:PORT/<realm>``.

    :param state_dir: directory to keep the CA, certificate, keys and URL in
        (None: keep everything in memory).
    :param listen: plain stream server endpoint string; TLS is added.
    :param realm: first path segment of the issuer URL.
    :param algs: algorithms to create one initial key each for.
    :param clock: source of time for minted tokens (default: the reactor).
    """

    def __init__(self, state_dir=None, *, listen=DEFAULT_LISTEN, realm="realm",
                 algs=("RS256", "ES256"), reactor=None, clock=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.state_dir = state_dir
        self.listen = listen
        self.realm = realm
        self.url = None
        self.failing = False
        self.requests = {}
        self.overrides = {}
        self.metadata = {}
        self.extra_metadata = {}
        self.login = None
        self._port = None
        self._site = None
        self.ca_pem, self._cert_pem, self._key_pem = self._credentials()
        keys_path = None if state_dir is None else self._path("keys.json")
        self.ring = (keys_path and KeyRing.load(keys_path)) or KeyRing(keys_path)
        if not self.ring.keys:
            for alg in algs:
                self.ring.add(alg)
        self._root = Resource()
        self._realm_resource = Resource()
        self._root.putChild(realm.encode("ascii"), self._realm_resource)
        self.add_endpoint(".well-known/openid-configuration", DiscoveryEndpoint(self, DISCOVERY))
        self.add_endpoint("jwks", JWKSEndpoint(self, JWKS), metadata="jwks_uri")

    # -- state -------------------------------------------------------------------

    def _path(self, name):
        return os.path.join(self.state_dir, name)

    def _credentials(self):
        if self.state_dir is not None and os.path.exists(self._path("server.key")):
            with open(self._path("ca.crt"), "rb") as f:
                ca = f.read()
            with open(self._path("server.crt"), "rb") as f:
                cert = f.read()
            with open(self._path("server.key"), "rb") as f:
                key = f.read()
            return ca, cert, key
        ca, ca_key = pki.new_ca("arc test OIDC issuer CA")
        cert, key = pki.issue(ca, ca_key, "localhost", dns_names=["localhost"],
                              ips=["127.0.0.1", "::1"])
        if self.state_dir is not None:
            os.makedirs(self.state_dir, exist_ok=True)
            pki.write_private(self._path("server.key"), key)
            pki.write_private(self._path("server.crt"), cert, 0o644)
            pki.write_private(self._path("ca.crt"), ca, 0o644)
        return ca, cert, key

    # -- keys ------------------------------------------------------------------

    def published(self):
        """Keys in the JWKS."""
        return list(self.ring.keys)

    def key(self, kid=None, alg="RS256"):
        """The key with ``kid`` (published or retired), else the current key for ``alg``."""
        return self.ring.key(kid, alg)

    def add_key(self, alg="RS256", kid=None, current=True):
        """Create and publish a key; with ``current`` it signs new ``alg`` tokens."""
        return self.ring.add(alg, kid, current)

    def retire_key(self, kid):
        """Remove ``kid`` from the JWKS (it can still mint, for tests)."""
        self.ring.retire(kid)

    def rotate(self, alg="RS256", retire=True):
        """Publish a new current key for ``alg``; retire the previous one."""
        old = self.ring.current.get(alg)
        kid = self.ring.add(alg)
        if retire and old is not None:
            self.ring.retire(old)
        return kid

    def public_pem(self, kid=None, alg="RS256"):
        return self.key(kid, alg).public_pem()

    def mint(self, claims=None, kid=None, alg="RS256", key=None, headers=None, ttl=3600):
        """A token for ``claims``.

        ``iss`` (this issuer), ``iat`` (now) and ``exp`` (now + ``ttl``) are
        filled in unless given; a claim given as None is left out.  The key is
        ``key`` if given (a private key object, or a secret for HS*), else the
        key ``kid``, else the current key for ``alg``.  ``headers`` are added
        to the JOSE header (None removes one, e.g. ``{"kid": None}``).
        """
        return self.ring.mint(self.url, self.clock.seconds(), claims, kid=kid, alg=alg,
                              key=key, headers=headers, ttl=ttl)

    # -- HTTP --------------------------------------------------------------------

    @property
    def issuer(self):
        return self.url

    @property
    def jwks_fetches(self):
        return self.requests.get(JWKS, 0)

    @property
    def discovery_fetches(self):
        return self.requests.get(DISCOVERY, 0)

    def add_endpoint(self, path, resource, metadata=None):
        """Serve ``resource`` at ``<issuer>/<path>``; ``metadata`` names its discovery key."""
        parent = self._realm_resource
        segments = path.split("/")
        for segment in segments[:-1]:
            child = parent.children.get(segment.encode("ascii"))
            if child is None:
                child = Resource()
                parent.putChild(segment.encode("ascii"), child)
            parent = child
        parent.putChild(segments[-1].encode("ascii"), resource)
        if metadata is not None:
            self.metadata[metadata] = path

    def override(self, name, status, body=b"", headers=None):
        """Answer endpoint ``name`` (``discovery``, ``jwks``...) with this instead."""
        if not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        self.overrides[name] = (status, dict(headers or {}), body)

    def clear_overrides(self):
        self.overrides.clear()

    def discovery_document(self):
        document = {
            "issuer": self.url,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self.ring.keys}),
        }
        for key, path in self.metadata.items():
            document[key] = "%s/%s" % (self.url, path)
        document.update(self.extra_metadata)
        return document

    def enable_login(self, **options):
        """Serve the device, authorization and token endpoints; the :class:`LoginFlows`.

        ``options`` are those of :class:`LoginFlows`.
        """
        flows = LoginFlows(self, **options)
        self.add_endpoint("device", DeviceAuthorizationEndpoint(self, DEVICE, flows),
                          metadata="device_authorization_endpoint")
        self.add_endpoint("authorize", AuthorizationEndpoint(self, AUTHORIZE, flows),
                          metadata="authorization_endpoint")
        self.add_endpoint("token", TokenEndpoint(self, TOKEN, flows), metadata="token_endpoint")
        self.login = flows
        return flows

    def start(self):
        """Listen; a Deferred firing with the issuer URL."""
        self._site = _Site(self._root)
        factory = TLSMemoryBIOFactory(server_options(self._cert_pem, self._key_pem), False,
                                      self._site)

        def listening(port):
            self._port = port
            address = port.getHost()
            host = address.host
            if host in ("0.0.0.0", ""):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            if ":" in host:
                host = "[%s]" % (host,)
            self.url = "https://%s:%d/%s" % (host, address.port, self.realm)
            if self.state_dir is not None:
                pki.write_private(self._path("url"), (self.url + "\n").encode("ascii"), 0o644)
            return self.url

        return serverFromString(self._reactor, self.listen).listen(factory).addCallback(listening)

    def stop(self):
        """Stop listening and close open connections; a Deferred."""
        if self._port is None:
            return succeed(None)
        port, self._port = self._port, None
        return DeferredList([port.stopListening(), self._site.close_all()],
                            consumeErrors=True)


# -- logging in: device code, authorization code + PKCE, refresh -----------------


class GrantRefused(Exception):
    """An OAuth error answer: ``(status, error, description)``."""

    def __init__(self, error, description, status=400):
        super().__init__(error)
        self.status = status
        self.error = error
        self.description = description

    def answer(self):
        return self.status, {"error": self.error, "error_description": self.description}


def _arg(request, name):
    values = request.args.get(name.encode("ascii"))
    return values[0].decode("utf-8") if values else None


def _loopback_redirect(uri):
    """True for ``http://127.0.0.1:PORT/...`` (or localhost, [::1]): RFC 8252 7.3."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")
            and port is not None and not parts.fragment)


def pkce_s256(verifier):
    return _b64(hashlib.sha256(verifier.encode("ascii")).digest())


class LoginFlows:
    """The grants of one public client, approving one test user by itself.

    :param client_id: the only client accepted; the ID tokens' ``aud``.
    :param claims: the user's claims in every ID token (default: alice, group dev).
    :param ttl: lifetime of the ID tokens, in seconds.
    :param pending: ``authorization_pending`` answers to each device code
        before it is approved.
    :param slow_down: answer the first poll of each device code ``slow_down``.
    :param interval: polling interval announced for device codes, in seconds.
    :param device_ttl: ``expires_in`` of device codes, in seconds.
    :param approve: False makes the user refuse (``access_denied``).

    ``grants`` lists ``(grant_type, outcome)`` of every token request.
    Refresh tokens rotate: each is good once; :meth:`revoke_refresh_tokens`
    makes every one refused.
    """

    def __init__(self, server, *, client_id="arc", claims=None, ttl=3600, pending=0,
                 slow_down=False, interval=5, device_ttl=600, approve=True):
        self.server = server
        self.client_id = client_id
        self.claims = dict(claims or {"sub": "alice", "email": "alice@example.com",
                                      "email_verified": True, "groups": ["dev"]})
        self.ttl = ttl
        self.pending = pending
        self.slow_down = slow_down
        self.interval = interval
        self.device_ttl = device_ttl
        self.approve = approve
        self.devices = {}
        self.codes = {}
        self.refresh_tokens = {}
        self.grants = []

    def _now(self):
        return self.server.clock.seconds()

    def _check_client(self, client_id):
        if client_id != self.client_id:
            raise GrantRefused("invalid_client", "unknown client %r" % (client_id,), 401)

    def revoke_refresh_tokens(self):
        self.refresh_tokens.clear()

    def tokens(self, scope, nonce=None):
        """A token response for the test user."""
        claims = dict(self.claims, aud=self.client_id, nonce=nonce, jti=secrets.token_hex(8))
        refresh = secrets.token_urlsafe(32)
        self.refresh_tokens[refresh] = scope
        return {"access_token": secrets.token_urlsafe(32), "token_type": "Bearer",
                "expires_in": self.ttl, "scope": scope, "refresh_token": refresh,
                "id_token": self.server.mint(claims, ttl=self.ttl)}

    # -- device authorization (RFC 8628) -----------------------------------------

    def start_device(self, client_id, scope):
        self._check_client(client_id)
        device_code = secrets.token_urlsafe(32)
        user_code = "%04d-%04d" % (secrets.randbelow(10000), secrets.randbelow(10000))
        self.devices[device_code] = {"polls": 0, "slowed": False, "scope": scope or "openid",
                                     "expires": self._now() + self.device_ttl}
        verify = "%s/device/verify" % (self.server.url,)
        return {"device_code": device_code, "user_code": user_code,
                "verification_uri": verify,
                "verification_uri_complete": verify + "?" + urlencode({"user_code": user_code}),
                "expires_in": self.device_ttl, "interval": self.interval}

    def poll_device(self, client_id, device_code):
        self._check_client(client_id)
        device = self.devices.get(device_code)
        if device is None:
            raise GrantRefused("invalid_grant", "unknown device code")
        if self._now() >= device["expires"]:
            del self.devices[device_code]
            raise GrantRefused("expired_token", "the device code expired")
        device["polls"] += 1
        if self.slow_down and not device["slowed"]:
            device["slowed"] = True
            raise GrantRefused("slow_down", "poll less often")
        if device["polls"] - device["slowed"] <= self.pending:
            raise GrantRefused("authorization_pending", "the user has not approved yet")
        del self.devices[device_code]
        if not self.approve:
            raise GrantRefused("access_denied", "the user refused")
        return self.tokens(device["scope"])

    # -- authorization code with PKCE (RFC 6749 4.1, RFC 7636) -------------------

    def authorize(self, request):
        """``(redirect URL)`` for an authorization request; GrantRefused if unusable."""
        self._check_client(_arg(request, "client_id"))
        redirect_uri = _arg(request, "redirect_uri") or ""
        if not _loopback_redirect(redirect_uri):
            raise GrantRefused("invalid_request", "redirect_uri must be a loopback http URL")
        if _arg(request, "response_type") != "code":
            raise GrantRefused("unsupported_response_type", "only code is supported")
        challenge = _arg(request, "code_challenge")
        if not challenge or _arg(request, "code_challenge_method") != "S256":
            raise GrantRefused("invalid_request", "PKCE with S256 is required")
        answer = {"state": _arg(request, "state")}
        if self.approve:
            code = secrets.token_urlsafe(32)
            self.codes[code] = {"redirect_uri": redirect_uri, "challenge": challenge,
                                "nonce": _arg(request, "nonce"),
                                "scope": _arg(request, "scope") or "openid"}
            answer["code"] = code
        else:
            answer.update(error="access_denied", error_description="the user refused")
        answer = {k: v for k, v in answer.items() if v is not None}
        separator = "&" if "?" in redirect_uri else "?"
        return redirect_uri + separator + urlencode(answer)

    def redeem_code(self, client_id, code, redirect_uri, verifier):
        self._check_client(client_id)
        grant = self.codes.pop(code or "", None)      # single use, even when refused
        if grant is None:
            raise GrantRefused("invalid_grant", "unknown or used authorization code")
        if redirect_uri != grant["redirect_uri"]:
            raise GrantRefused("invalid_grant", "redirect_uri differs from the authorization "
                                                "request")
        if not verifier or pkce_s256(verifier) != grant["challenge"]:
            raise GrantRefused("invalid_grant", "PKCE verification failed")
        return self.tokens(grant["scope"], grant["nonce"])

    # -- refresh (RFC 6749 6) ----------------------------------------------------

    def refresh(self, client_id, refresh_token):
        self._check_client(client_id)
        scope = self.refresh_tokens.pop(refresh_token or "", None)
        if scope is None:
            raise GrantRefused("invalid_grant", "refresh token unknown, used or revoked")
        return self.tokens(scope)

    # -- the token endpoint ------------------------------------------------------

    def token(self, request):
        grant_type = _arg(request, "grant_type")
        client_id = _arg(request, "client_id")
        try:
            if grant_type == DEVICE_GRANT:
                answer = self.poll_device(client_id, _arg(request, "device_code"))
            elif grant_type == "authorization_code":
                answer = self.redeem_code(client_id, _arg(request, "code"),
                                          _arg(request, "redirect_uri"),
                                          _arg(request, "code_verifier"))
            elif grant_type == "refresh_token":
                answer = self.refresh(client_id, _arg(request, "refresh_token"))
            else:
                raise GrantRefused("unsupported_grant_type", "grant %r" % (grant_type,))
        except GrantRefused as e:
            self.grants.append((grant_type, e.error))
            return e.answer()
        self.grants.append((grant_type, "ok"))
        return 200, answer


class DeviceAuthorizationEndpoint(Endpoint):
    def __init__(self, server, name, flows):
        super().__init__(server, name)
        self.flows = flows

    def answer(self, request):
        if request.method != b"POST":
            return 405, {"error": "invalid_request", "error_description": "POST only"}
        try:
            return 200, self.flows.start_device(_arg(request, "client_id"),
                                                _arg(request, "scope"))
        except GrantRefused as e:
            return e.answer()


class TokenEndpoint(DeviceAuthorizationEndpoint):
    def answer(self, request):
        if request.method != b"POST":
            return 405, {"error": "invalid_request", "error_description": "POST only"}
        return self.flows.token(request)


class AuthorizationEndpoint(DeviceAuthorizationEndpoint):
    """Approves (or refuses) at once and redirects to the loopback redirect URI."""

    def answer(self, request):
        try:
            location = self.flows.authorize(request)
        except GrantRefused as e:
            return e.answer()
        request.setHeader(b"location", location.encode("ascii"))
        return 302, {"redirect": "loopback"}


# -- command line ----------------------------------------------------------------


class MintOptions(usage.Options):
    synopsis = "mint --sub SUB [--aud AUD] [--groups A,B] [--ttl SECONDS] [options]"
    optParameters = [
        ["sub", None, None, "subject (sub claim)"],
        ["aud", None, "arc", "audience (aud claim)"],
        ["groups", None, None, "comma-separated groups claim"],
        ["email", None, None, "email claim"],
        ["ttl", None, 3600, "lifetime in seconds", int],
        ["alg", None, "RS256", "signing algorithm (a current key of the issuer)"],
        ["kid", None, None, "sign with this key id"],
    ]
    optFlags = [["email-verified", None, "set email_verified: true"]]

    def __init__(self):
        super().__init__()
        self["claims"] = {}

    def opt_claim(self, spec):
        """NAME=JSON extra claim (repeatable), e.g. --claim 'roles=["a"]'"""
        name, sep, value = spec.partition("=")
        if not sep:
            raise usage.UsageError("--claim wants NAME=JSON")
        try:
            self["claims"][name] = json.loads(value)
        except ValueError:
            self["claims"][name] = value

    def postOptions(self):
        if not self["sub"]:
            raise usage.UsageError("--sub is required")


class Options(usage.Options):
    synopsis = "python -m arc.testing.oidc --state-dir DIR [--listen ENDPOINT] [mint ...]"
    optParameters = [
        ["state-dir", None, None, "directory for ca.crt, keys.json and url"],
        ["listen", None, DEFAULT_LISTEN, "plain stream endpoint to serve HTTPS on"],
        ["realm", None, "realm", "first path segment of the issuer URL"],
        ["login-client-id", None, None, "serve the login endpoints for this client id"],
        ["login-sub", None, "alice", "subject of the user the login endpoints approve"],
        ["login-groups", None, "dev", "comma-separated groups of that user"],
        ["login-ttl", None, 3600, "lifetime of the ID tokens they issue, in seconds", int],
    ]
    subCommands = [["mint", None, MintOptions, "print a token signed with DIR's keys"]]

    def postOptions(self):
        if not self["state-dir"]:
            raise usage.UsageError("--state-dir is required")


def mint_from_state(state_dir, options, now=None):
    """A token minted with the keys and URL saved in ``state_dir``."""
    ring = KeyRing.load(os.path.join(state_dir, "keys.json"))
    try:
        with open(os.path.join(state_dir, "url"), "r", encoding="ascii") as f:
            url = f.read().strip()
    except OSError:
        url = None
    if ring is None or not url:
        raise SystemExit("no keys or no url in %s: start the issuer with this --state-dir "
                         "first" % (state_dir,))
    claims = {"sub": options["sub"], "aud": options["aud"]}
    if options["groups"] is not None:
        claims["groups"] = [g for g in options["groups"].split(",") if g]
    if options["email"]:
        claims["email"] = options["email"]
        claims["email_verified"] = bool(options["email-verified"])
    claims.update(options["claims"])
    return ring.mint(url, time.time() if now is None else now, claims, kid=options["kid"],
                     alg=options["alg"], ttl=options["ttl"])


async def serve(reactor, config):
    server = OIDCIssuerServer(config["state-dir"], listen=config["listen"],
                              realm=config["realm"], reactor=reactor)
    if config["login-client-id"]:
        groups = [g for g in config["login-groups"].split(",") if g]
        server.enable_login(client_id=config["login-client-id"], ttl=config["login-ttl"],
                            claims={"sub": config["login-sub"], "groups": groups})
    url = await server.start()
    reactor.addSystemEventTrigger("before", "shutdown", server.stop)
    print("oidc issuer listening on %s" % (url,), flush=True)
    await Deferred()


def main(argv):
    config = Options()
    try:
        config.parseOptions(argv)
    except usage.UsageError as e:
        print("%s\nerror: %s" % (config, e), file=sys.stderr)
        return 2
    if config.subCommand == "mint":
        print(mint_from_state(config["state-dir"], config.subOptions))
        return 0
    from twisted.internet.task import react
    react(serve, (config,))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

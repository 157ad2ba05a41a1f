"""Tests for L{arc.identity}: static tokens, OIDC ID tokens and the authenticator.

The sans-I/O parts (header parsing, JWS shape and algorithm checks, claim
mapping, time checks, configuration) are tested directly.  Token
verification runs against a real issuer (L{arc.testing.oidc}) on 127.0.0.1,
fetched over verified HTTPS by the real fetcher; time (token validity,
refetch rate limiting, the refresh schedule) comes from a L{Clock}.  Every
test that mints tokens also checks that no token reaches an error message
or a log event.
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone

from arc import config
from arc.errors import ConfigError
from arc.identity.authenticator import (
    PASSTHROUGH,
    Authenticator,
    bearer_from_header,
    parse_identity,
)
from arc.identity.claims import check_times, principal_from_claims
from arc.identity.fetch import DocumentFetcher, FetchError, _CappedReader
from arc.identity.jwks import KeySet, KeySetError
from arc.identity.jws import check_algorithm, looks_like_jwt, parse_compact, unverified_issuer
from arc.identity.model import AuthError, Principal
from arc.identity.oidc import IssuerSettings, OIDCIssuer
from arc.identity.static import StaticTokens
from arc.relay.registry import token_digest
from arc.testing.oidc import KeyRing, OIDCIssuerServer, SigningKey

NOW = 1_700_000_000
CLIENT_ID = "arc"
IDP = "https://idp.example.com"
STATIC_TOKEN = "ci-7f3a9c2e41d84b0f9a6e5d3c2b1a0f9e"


def settings(issuer=IDP, **overrides):
    overrides.setdefault("client_id", CLIENT_ID)
    return IssuerSettings(issuer=issuer, **overrides)


def claims(**values):
    base = {"iss": IDP, "sub": "u-1", "aud": CLIENT_ID, "iat": NOW, "exp": NOW + 3600}
    base.update(values)
    return {k: v for k, v in base.items() if v is not None}


class NoTokenLeaks:
    """Mixin: remember every token; none may appear in an error or a log event."""

    def watch_logs(self):
        self.secrets = []
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.addCleanup(self.assert_no_token_logged)

    def remember(self, token):
        self.secrets.append(token)
        signature = token.rsplit(".", 1)[-1]
        if len(signature) >= 16:
            self.secrets.append(signature)
        return token

    def assert_no_token_in(self, text):
        for secret in self.secrets:
            self.assertNotIn(secret, text)

    def assert_no_token_logged(self):
        for event in self.events:
            self.assert_no_token_in(formatEvent(event) or "")
            self.assert_no_token_in(repr(event))

    def assert_refused(self, error, code):
        self.assertIsInstance(error, AuthError)
        self.assertEqual(error.code, code, error.reason)
        self.assertTrue(error.reason)
        self.assert_no_token_in(str(error))
        self.assert_no_token_in(repr(error))
        self.assert_no_token_in(error.reason)
        return error


# -- bearer header ---------------------------------------------------------------


class BearerHeaderTests(SynchronousTestCase):

    def refused(self, value, code):
        with self.assertRaises(AuthError) as caught:
            bearer_from_header(value)
        self.assertEqual(caught.exception.code, code)
        return caught.exception

    def test_bearer(self):
        self.assertEqual(bearer_from_header("Bearer abc.def-_~+/=="), "abc.def-_~+/==")
        self.assertEqual(bearer_from_header(b"Bearer abc"), "abc")
        self.assertEqual(bearer_from_header([b"Bearer abc"]), "abc")

    def test_scheme_case_insensitive(self):
        self.assertEqual(bearer_from_header("bearer abc"), "abc")
        self.assertEqual(bearer_from_header("BEARER abc"), "abc")

    def test_missing_and_empty(self):
        for value in (None, "", "   ", b"", [], "Bearer", "Bearer   "):
            self.refused(value, "missing")

    def test_two_values(self):
        self.refused("Bearer a b", "malformed")

    def test_two_schemes(self):
        error = self.refused("Bearer secret-one, Basic c2VjcmV0", "malformed")
        self.assertNotIn("secret-one", error.reason)
        self.refused("Bearer a,Bearer b", "malformed")

    def test_two_headers(self):
        self.refused([b"Bearer a", b"Bearer b"], "malformed")

    def test_other_scheme_not_echoed(self):
        error = self.refused("Basic dXNlcjpwYXNzd29yZA==", "malformed")
        self.assertNotIn("dXNlcjpwYXNzd29yZA", error.reason)
        error = self.refused("eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "malformed")
        self.assertNotIn("eyJhbGciOiJSUzI1NiJ9", error.reason)


# -- JWS shape and algorithms ----------------------------------------------------


class UnverifiedTests(SynchronousTestCase):

    def setUp(self):
        self.ring = KeyRing()
        self.ring.add("RS256")

    def token(self, **kw):
        return self.ring.mint(IDP, NOW, claims(), **kw)

    def test_looks_like_jwt(self):
        self.assertTrue(looks_like_jwt(self.token()))
        for value in ("", "abc", "a.b", "a.b.c.d", "a.b.c.d.e", None, "e30.e30.!!", "....",
                      "sha256~kubernetes-service-account-ish"):
            self.assertFalse(looks_like_jwt(value), value)

    def test_unverified_issuer(self):
        self.assertEqual(unverified_issuer(self.token()), IDP)
        self.assertIsNone(unverified_issuer("not-a-jwt"))
        self.assertIsNone(unverified_issuer(self.ring.mint(7, NOW, {}, alg="none")))

    def test_not_three_parts(self):
        for token in ("abc", "a.b", "a.b.c.d", "a..c", "a.b.c d"):
            with self.assertRaises(AuthError) as caught:
                parse_compact(token)
            self.assertEqual(caught.exception.code, "malformed")

    def test_jwe_named(self):
        with self.assertRaises(AuthError) as caught:
            parse_compact("a.b.c.d.e")
        self.assertIn("JWE", caught.exception.reason)

    def test_payload_not_json_object(self):
        token = self.token()
        header = token.split(".")[0]
        with self.assertRaises(AuthError):
            parse_compact(header + ".WzEsMiwzXQ.sig")     # [1,2,3]

    def test_too_long(self):
        with self.assertRaises(AuthError) as caught:
            parse_compact("a" * 70000 + ".b.c")
        self.assertEqual(caught.exception.code, "malformed")

    def test_algorithms(self):
        allowed = ("RS256", "ES256")
        self.assertEqual(check_algorithm({"alg": "RS256"}, allowed), "RS256")
        for alg in ("none", "None", "NONE", "HS256", "hs512", "HS384", "RS384", "", None, 5):
            with self.assertRaises(AuthError) as caught:
                check_algorithm({"alg": alg}, allowed)
            self.assertEqual(caught.exception.code, "bad_algorithm", alg)
        with self.assertRaises(AuthError):
            check_algorithm({}, allowed)
        with self.assertRaises(AuthError):
            check_algorithm({"alg": "RS256", "kid": 7}, allowed)


class KeySetTests(SynchronousTestCase):

    def test_only_asymmetric_signing_keys(self):
        rsa = SigningKey.generate("r", "RS256").jwk()
        ec = SigningKey.generate("e", "ES256").jwk()
        enc = dict(SigningKey.generate("x", "RS256").jwk(), use="enc")
        oct_ = {"kty": "oct", "kid": "h", "k": "c2VjcmV0"}
        keys = KeySet.parse({"keys": [rsa, ec, enc, oct_, "junk"]}, ("RS256", "ES256"))
        self.assertEqual(sorted(keys.kids()), ["e", "r"])
        self.assertEqual(keys.dropped, 3)
        self.assertEqual(len(keys.candidates("r", "RS256")), 1)
        self.assertEqual(keys.candidates("r", "ES256"), [])
        self.assertEqual(keys.candidates("e", "ES384"), [])
        self.assertEqual(keys.candidates("h", "HS256"), [])

    def test_key_alg_binds(self):
        """A key published for RS256 is not used for PS256 tokens."""
        rsa = SigningKey.generate("r", "RS256").jwk()
        keys = KeySet.parse({"keys": [rsa]}, ("RS256", "PS256"))
        self.assertEqual(keys.candidates("r", "PS256"), [])
        del rsa["alg"]
        keys = KeySet.parse({"keys": [rsa]}, ("RS256", "PS256"))
        self.assertEqual(len(keys.candidates("r", "PS256")), 1)

    def test_no_usable_key(self):
        with self.assertRaises(KeySetError):
            KeySet.parse({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, ("RS256",))
        with self.assertRaises(KeySetError):
            KeySet.parse({"nokeys": []}, ("RS256",))


# -- claims ----------------------------------------------------------------------


class TimeTests(SynchronousTestCase):

    def refused(self, values, code):
        with self.assertRaises(AuthError) as caught:
            check_times(claims(**values), NOW, 60)
        self.assertEqual(caught.exception.code, code)
        return caught.exception

    def test_valid(self):
        check_times(claims(), NOW, 60)

    def test_expired(self):
        error = self.refused({"exp": NOW - 600}, "expired")
        self.assertIn("10 min ago", error.reason)
        self.assertIn("arc login", error.reason)
        self.refused({"exp": NOW - 61}, "expired")

    def test_expired_within_skew(self):
        check_times(claims(exp=NOW - 59), NOW, 60)

    def test_future_iat(self):
        self.refused({"iat": NOW + 120}, "not_yet_valid")
        check_times(claims(iat=NOW + 59), NOW, 60)

    def test_future_nbf(self):
        self.refused({"nbf": NOW + 120}, "not_yet_valid")
        check_times(claims(nbf=NOW + 59), NOW, 60)

    def test_missing(self):
        self.refused({"exp": None}, "missing_claim")
        self.refused({"iat": None}, "missing_claim")

    def test_not_numbers(self):
        self.refused({"exp": "tomorrow"}, "bad_claim")
        self.refused({"iat": True}, "bad_claim")


class PrincipalTests(SynchronousTestCase):

    def refused(self, values, code, **config):
        with self.assertRaises(AuthError) as caught:
            principal_from_claims(claims(**values), settings(**config))
        self.assertEqual(caught.exception.code, code)
        return caught.exception

    def test_default_username_prefix(self):
        """Like the Kubernetes API server: sub is prefixed with the issuer and '#'."""
        principal = principal_from_claims(claims(groups=["dev"]), settings())
        self.assertEqual(principal.username, IDP + "#u-1")
        self.assertEqual(principal.groups, ("dev",))
        self.assertEqual(principal.method, "oidc")
        self.assertEqual(principal.extra, {"arc.dev/issuer": (IDP,), "arc.dev/subject": ("u-1",)})

    def test_explicit_prefixes(self):
        principal = principal_from_claims(claims(groups=["dev", "dev"]),
                                          settings(username_prefix="", groups_prefix="oidc:"))
        self.assertEqual(principal.username, "u-1")
        self.assertEqual(principal.groups, ("oidc:dev",))

    def test_groups_string_or_list(self):
        one = principal_from_claims(claims(groups="dev"), settings())
        self.assertEqual(one.groups, ("dev",))
        none = principal_from_claims(claims(), settings())
        self.assertEqual(none.groups, ())
        self.refused({"groups": {"a": 1}}, "bad_claim")
        self.refused({"groups": ["a", 2]}, "bad_claim")

    def test_custom_groups_claim(self):
        principal = principal_from_claims(claims(roles=["admin"]),
                                          settings(groups_claim="roles"))
        self.assertEqual(principal.groups, ("admin",))

    def test_email_needs_verification(self):
        good = principal_from_claims(claims(email="a@example.com", email_verified=True),
                                     settings(username_claim="email"))
        self.assertEqual(good.username, "a@example.com")
        self.refused({"email": "a@example.com", "email_verified": False}, "unverified_email",
                     username_claim="email")
        self.refused({"email": "a@example.com", "email_verified": "true"}, "unverified_email",
                     username_claim="email")
        error = self.refused({"email": "a@example.com"}, "unverified_email",
                             username_claim="email")
        self.assertIn("email_verified", error.reason)

    def test_missing_username_claim(self):
        self.refused({}, "missing_claim", username_claim="preferred_username")

    def test_system_identities(self):
        error = self.refused({"groups": ["dev", "system:masters"]}, "forbidden_identity")
        self.assertIn("system:masters", error.reason)
        self.refused({"sub": "system:admin"}, "forbidden_identity", username_prefix="")
        self.refused({"groups": ["masters"]}, "forbidden_identity", groups_prefix="system:")
        ok = principal_from_claims(claims(groups=["system:masters"]),
                                   settings(groups_prefix="oidc:"))
        self.assertEqual(ok.groups, ("oidc:system:masters",))

    def test_overage(self):
        for extra in ({"_claim_names": {"groups": "src1"},
                       "_claim_sources": {"src1": {"endpoint": "https://graph"}}},
                      {"hasgroups": True},
                      {"_claim_sources": {"src1": {"endpoint": "https://graph"}}}):
            error = self.refused(extra, "overage")
            self.assertIn("too many groups", error.reason)
            self.assertIn("group filtering", error.reason)

    def test_extra_claims(self):
        principal = principal_from_claims(
            claims(acr="mfa", amr=["pwd", "otp"]),
            settings(extra_claims=(("acr", "example.com/acr"), ("amr", "example.com/amr"),
                                   ("absent", "example.com/absent"))))
        self.assertEqual(principal.extra["example.com/acr"], ("mfa",))
        self.assertEqual(principal.extra["example.com/amr"], ("pwd", "otp"))
        self.assertNotIn("example.com/absent", principal.extra)
        self.assertTrue(all(k == k.lower() for k in principal.extra))

    def test_describe(self):
        principal = principal_from_claims(claims(groups=["dev"]), settings(username_prefix=""))
        self.assertIn("'u-1'", principal.describe())
        self.assertIn("'dev'", principal.describe())


# -- static tokens ---------------------------------------------------------------


class StaticTokenTests(SynchronousTestCase):

    def test_lookup(self):
        static = StaticTokens({"ci": (token_digest(STATIC_TOKEN).upper(), ("deployers",))})
        principal = static.authenticate(STATIC_TOKEN)
        self.assertEqual(principal, Principal("ci", ("deployers",), {}, "", "ci", "static"))
        self.assertIsNone(static.authenticate(STATIC_TOKEN + "x"))
        self.assertIsNone(static.authenticate(""))
        self.assertIsNone(static.authenticate(None))


# -- configuration ---------------------------------------------------------------


class ConfigTests(SynchronousTestCase):

    def load(self, text, files=None):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for name, data in (files or {}).items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        self.path = os.path.join(directory, "relay.yaml")
        with open(self.path, "w") as f:
            f.write(text)
        return parse_identity(config.load(self.path).section("identity"), reactor=Clock())

    def error(self, text, key, *words, files=None):
        with self.assertRaises(ConfigError) as caught:
            self.load(text, files)
        message = str(caught.exception)
        self.assertIn(self.path, message)
        self.assertEqual(caught.exception.key, key)
        for word in words:
            self.assertIn(word, message)
        return message

    def test_full_example(self):
        ca, _ = __import__("arc.pki").pki.new_ca("idp")
        auth = self.load("""
identity:
  static:
    alice: {token_sha256: "%s", groups: [dev]}
  oidc:
    - issuer: https://login.example.com/tenant/v2.0
      client_id: arc
      username_claim: email
      groups_claim: groups
      groups_prefix: "oidc:"
      ca_file: idp-ca.crt
      extra_claims: {acr: example.com/acr}
  passthrough: false
""" % (token_digest(STATIC_TOKEN),), {"idp-ca.crt": ca})
        self.assertFalse(auth.passthrough)
        self.assertEqual(auth.static.authenticate(STATIC_TOKEN).username, "alice")
        issuer = auth.issuers["https://login.example.com/tenant/v2.0"]
        s = issuer.settings
        self.assertEqual((s.client_id, s.username_claim, s.username_prefix, s.groups_prefix),
                         ("arc", "email", "", "oidc:"))
        self.assertEqual(s.ca_pem, ca)
        self.assertEqual(s.algorithms, ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                                        "PS256", "PS384", "PS512"))
        self.assertEqual((s.jwks_refresh, s.kid_refetch_interval, s.max_document_size),
                         (3600.0, 60.0, 1048576))
        self.assertEqual(s.extra_claims, (("acr", "example.com/acr"),))
        self.assertEqual(len(auth.services()), 1)

    def test_default_username_prefix(self):
        auth = self.load("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', "
                         "client_id: arc}\n")
        self.assertEqual(auth.issuers[IDP].settings.username_prefix, IDP + "#")

    def test_empty_username_prefix(self):
        auth = self.load("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', "
                         "client_id: arc, username_prefix: ''}\n")
        self.assertEqual(auth.issuers[IDP].settings.username_prefix, "")

    def test_hmac_algorithm_refused(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', client_id: arc,"
                   " algorithms: [RS256, HS256]}\n", "identity.oidc[0].algorithms",
                   "HS256", "never accepted")

    def test_none_algorithm_refused(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', client_id: arc,"
                   " algorithms: [none]}\n", "identity.oidc[0].algorithms", "never accepted")

    def test_unknown_algorithm(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', client_id: arc,"
                   " algorithms: [EdDSA]}\n", "identity.oidc[0].algorithms", "not supported")

    def test_http_issuer(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'http://idp.example.com', "
                   "client_id: arc}\n", "identity.oidc[0].issuer", "https://")

    def test_missing_client_id(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com'}\n",
                   "identity.oidc[0].client_id", "required")

    def test_missing_ca_file(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', client_id: arc,"
                   " ca_file: nope.crt}\n", "identity.oidc[0].ca_file", "does not exist")

    def test_ca_file_not_pem(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', client_id: arc,"
                   " ca_file: ca.crt}\n", "identity.oidc[0].ca_file", "no PEM certificate",
                   files={"ca.crt": b"hello"})

    def test_unknown_key(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', client_id: arc,"
                   " client_secret: x}\n", "identity.oidc[0].client_secret", "unknown key")

    def test_duplicate_issuer(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', client_id: a}"
                   "\n    - {issuer: 'https://idp.example.com', client_id: b}\n",
                   "identity.oidc[1].issuer", "already configured")

    def test_reserved_extra_key(self):
        self.error("identity:\n  oidc:\n    - {issuer: 'https://idp.example.com', client_id: arc,"
                   " extra_claims: {iss: arc.dev/issuer}}\n",
                   "identity.oidc[0].extra_claims.iss", "reserved")

    def test_nothing_configured(self):
        self.error("identity:\n  passthrough: false\n", "identity.oidc", "nothing would be")

    def test_passthrough_only(self):
        self.assertTrue(self.load("identity:\n  passthrough: true\n").passthrough)

    def test_static_errors(self):
        self.error("identity:\n  static:\n    a: {token_sha256: abc}\n",
                   "identity.static.a.token_sha256", "hex SHA-256")
        digest = token_digest(STATIC_TOKEN)
        self.error("identity:\n  static:\n    a: {token_sha256: %s, groups: [system:masters]}\n"
                   % (digest,), "identity.static.a.groups[0]", "reserved")
        self.error("identity:\n  static:\n    'system:x': {token_sha256: %s}\n" % (digest,),
                   "identity.static.system:x", "reserved")
        self.error("identity:\n  static:\n    a: {token_sha256: %s}\n    b: {token_sha256: %s}\n"
                   % (digest, digest), "identity.static.b.token_sha256", "same token")


# -- against a real issuer -------------------------------------------------------


class LiveIssuerTestCase(NoTokenLeaks, TestCase):
    """A local issuer on 127.0.0.1, an OIDCIssuer for it, and a Clock."""

    def setUp(self):
        self.watch_logs()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.server = OIDCIssuerServer(clock=self.clock)
        self.addCleanup(self.server.stop)
        return self.server.start()

    def issuer(self, **overrides):
        overrides.setdefault("ca_pem", self.server.ca_pem)
        issuer = OIDCIssuer(settings(self.server.url, **overrides), reactor=reactor,
                            clock=self.clock)
        self.addCleanup(issuer.stop)
        return issuer

    def token(self, values=None, **kw):
        body = {"sub": "alice", "aud": CLIENT_ID, "groups": ["dev"]}
        body.update(values or {})
        return self.remember(self.server.mint(body, **kw))

    @inlineCallbacks
    def refused(self, d, code):
        error = yield self.assertFailure(d, AuthError)
        return self.assert_refused(error, code)


class VerificationTests(LiveIssuerTestCase):

    @inlineCallbacks
    def test_rs256_and_es256(self):
        issuer = self.issuer(username_prefix="")
        for alg in ("RS256", "ES256"):
            principal = yield issuer.authenticate(self.token(alg=alg))
            self.assertEqual(principal.username, "alice")
            self.assertEqual(principal.groups, ("dev",))
            self.assertEqual(principal.issuer, self.server.url)
            self.assertEqual(principal.extra["arc.dev/subject"], ("alice",))
        self.assertEqual(self.server.jwks_fetches, 1)

    @inlineCallbacks
    def test_alg_none(self):
        issuer = self.issuer()
        yield self.refused(issuer.authenticate(self.token(alg="none")), "bad_algorithm")
        self.assertEqual(self.server.jwks_fetches, 0, "key lookup before the algorithm check")

    @inlineCallbacks
    def test_hs256_signed_with_public_key(self):
        """The key-confusion attack: HMAC keyed with the IdP's public key PEM."""
        issuer = self.issuer()
        yield issuer.refresh()
        for pem in (self.server.public_pem(), self.server.public_pem().strip()):
            token = self.token(alg="HS256", key=pem, kid=self.server.key().kid)
            yield self.refused(issuer.authenticate(token), "bad_algorithm")
        # Even past the header check, no key in the set can verify HS256.
        self.assertEqual(issuer.keys.candidates(self.server.key().kid, "HS256"), [])

    @inlineCallbacks
    def test_algorithm_off_allow_list(self):
        issuer = self.issuer(algorithms=("ES256",))
        yield self.refused(issuer.authenticate(self.token()), "bad_algorithm")

    @inlineCallbacks
    def test_key_alg_mismatch(self):
        """An RS256 key never verifies an ES256 header, whatever the kid says."""
        issuer = self.issuer()
        token = self.token(alg="ES256", headers={"kid": self.server.key().kid})
        yield self.refused(issuer.authenticate(token), "bad_algorithm")

    @inlineCallbacks
    def test_bad_signature(self):
        issuer = self.issuer()
        stranger = SigningKey.generate("x", "RS256")
        token = self.token(key=stranger.private_key, kid=self.server.key().kid)
        yield self.refused(issuer.authenticate(token), "bad_signature")
        header, payload, signature = self.token().split(".")
        tampered = self.remember(header + "." + payload[:-2] + "xx." + signature)
        error = yield self.assertFailure(issuer.authenticate(tampered), AuthError)
        self.assertIn(error.code, ("bad_signature", "malformed"))
        self.assert_refused(error, error.code)

    @inlineCallbacks
    def test_wrong_issuer(self):
        issuer = self.issuer()
        for iss in ("https://other.example.com", self.server.url + ".evil",
                    self.server.url + "/", self.server.url[:-1], None):
            yield self.refused(issuer.authenticate(self.token({"iss": iss})), "wrong_issuer")
        self.assertEqual(self.server.jwks_fetches, 0)

    @inlineCallbacks
    def test_wrong_audience(self):
        issuer = self.issuer()
        error = yield self.refused(issuer.authenticate(self.token({"aud": "kubernetes"})),
                                   "wrong_audience")
        self.assertIn("'arc'", error.reason)
        yield self.refused(issuer.authenticate(self.token({"aud": ["a", "b"]})),
                           "wrong_audience")
        yield self.refused(issuer.authenticate(self.token({"aud": "arcx"})), "wrong_audience")

    @inlineCallbacks
    def test_audience_list(self):
        issuer = self.issuer()
        principal = yield issuer.authenticate(self.token({"aud": ["other", CLIENT_ID]}))
        self.assertEqual(principal.subject, "alice")

    @inlineCallbacks
    def test_expired(self):
        issuer = self.issuer()
        token = self.token(ttl=600)
        yield issuer.authenticate(token)
        self.clock.advance(600 + 59)
        yield issuer.authenticate(token)
        self.clock.advance(2)
        error = yield self.refused(issuer.authenticate(token), "expired")
        self.assertIn("arc login", error.reason)

    @inlineCallbacks
    def test_future_iat_and_nbf(self):
        issuer = self.issuer()
        yield self.refused(issuer.authenticate(self.token({"iat": NOW + 90})), "not_yet_valid")
        yield self.refused(issuer.authenticate(self.token({"nbf": NOW + 90})), "not_yet_valid")
        yield issuer.authenticate(self.token({"iat": NOW + 50}))
        yield issuer.authenticate(self.token({"nbf": NOW + 50}))

    @inlineCallbacks
    def test_required_claims(self):
        issuer = self.issuer()
        for claim in ("exp", "iat", "sub", "aud"):
            error = yield self.refused(issuer.authenticate(self.token({claim: None})),
                                       "missing_claim")
            self.assertIn(claim, error.reason)

    @inlineCallbacks
    def test_system_masters_refused(self):
        issuer = self.issuer()
        error = yield self.refused(
            issuer.authenticate(self.token({"groups": ["dev", "system:masters"]})),
            "forbidden_identity")
        self.assertIn("system:masters", error.reason)

    @inlineCallbacks
    def test_email_username(self):
        issuer = self.issuer(username_claim="email")
        principal = yield issuer.authenticate(
            self.token({"email": "alice@example.com", "email_verified": True}))
        self.assertEqual(principal.username, "alice@example.com")
        yield self.refused(issuer.authenticate(
            self.token({"email": "alice@example.com", "email_verified": False})),
            "unverified_email")
        yield self.refused(issuer.authenticate(self.token({"email": "alice@example.com"})),
                           "unverified_email")

    @inlineCallbacks
    def test_groups_string_and_list(self):
        issuer = self.issuer(groups_prefix="oidc:")
        one = yield issuer.authenticate(self.token({"groups": "ops"}))
        self.assertEqual(one.groups, ("oidc:ops",))
        two = yield issuer.authenticate(self.token({"groups": ["ops", "dev"]}))
        self.assertEqual(two.groups, ("oidc:ops", "oidc:dev"))

    @inlineCallbacks
    def test_prefixes(self):
        default = yield self.issuer().authenticate(self.token())
        self.assertEqual(default.username, self.server.url + "#alice")
        self.assertEqual(default.groups, ("dev",))
        custom = yield self.issuer(username_prefix="oidc:", groups_prefix="oidc:").authenticate(
            self.token())
        self.assertEqual((custom.username, custom.groups), ("oidc:alice", ("oidc:dev",)))

    @inlineCallbacks
    def test_overage(self):
        issuer = self.issuer()
        token = self.token({"groups": None, "_claim_names": {"groups": "src1"},
                            "_claim_sources": {"src1": {"endpoint": "https://graph.example"}}})
        error = yield self.refused(issuer.authenticate(token), "overage")
        self.assertIn("too many groups", error.reason)

    @inlineCallbacks
    def test_token_without_kid(self):
        """Without a kid, every key fitting the algorithm is tried."""
        issuer = self.issuer()
        principal = yield issuer.authenticate(self.token(headers={"kid": None}))
        self.assertEqual(principal.subject, "alice")

    @inlineCallbacks
    def test_malformed(self):
        issuer = self.issuer()
        for token in ("", "x", "a.b.c", "a.b.c.d.e"):
            error = yield self.assertFailure(issuer.authenticate(token), AuthError)
            self.assertIn(error.code, ("missing", "malformed"))


class KeyFetchTests(LiveIssuerTestCase):

    @inlineCallbacks
    def test_unknown_kid_flood_one_refetch_per_interval(self):
        issuer = self.issuer()
        yield issuer.refresh()
        self.assertEqual(self.server.jwks_fetches, 1)

        def flood(tag):
            return [issuer.authenticate(self.token(headers={"kid": "%s-%d" % (tag, i)}))
                    for i in range(100)]

        pending = flood("a")
        self.assertEqual(issuer.fetches, 2, "concurrent callers must share one fetch")
        results = yield DeferredList(pending, consumeErrors=True)
        for ok, failure in results:
            self.assertFalse(ok)
            self.assert_refused(failure.value, "unknown_key")
        self.assertEqual(self.server.jwks_fetches, 2)
        self.clock.advance(59)
        yield DeferredList(flood("b"), consumeErrors=True)
        self.assertEqual(self.server.jwks_fetches, 2)
        self.clock.advance(2)
        yield DeferredList(flood("c"), consumeErrors=True)
        self.assertEqual(self.server.jwks_fetches, 3)

    @inlineCallbacks
    def test_rotation(self):
        issuer = self.issuer()
        first = yield issuer.authenticate(self.token())
        self.assertEqual(first.subject, "alice")
        old = self.server.key().kid
        new = self.server.rotate()
        principal = yield issuer.authenticate(self.token())
        self.assertEqual(principal.subject, "alice")
        self.assertEqual(self.server.jwks_fetches, 2)
        yield issuer.authenticate(self.token({"sub": "bob"}))
        self.assertEqual(self.server.jwks_fetches, 2)
        self.assertIn(new, issuer.keys.kids())
        self.assertNotIn(old, issuer.keys.kids())
        error = yield self.refused(issuer.authenticate(self.token(kid=old)), "unknown_key")
        self.assertIn("retired", error.reason)

    @inlineCallbacks
    def test_idp_down_keeps_last_good_keys(self):
        issuer = self.issuer()
        self.assertIsNone((yield issuer.refresh()))
        self.server.failing = True
        outcome = yield issuer.refresh()
        self.assertIn("503", outcome)
        principal = yield issuer.authenticate(self.token())
        self.assertEqual(principal.subject, "alice")
        error = yield self.refused(issuer.authenticate(self.token(headers={"kid": "new"})),
                                   "unknown_key")
        self.assertIn("503", error.reason)
        self.clock.advance(30)
        yield issuer.refresh()
        errors = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1, "an outage is logged once per interval")
        self.assertIn("last good keys", formatEvent(errors[0]))
        self.server.failing = False
        self.clock.advance(30)
        self.assertIsNone((yield issuer.refresh()))
        self.assertTrue(any("fetched again" in formatEvent(e) for e in self.events))

    @inlineCallbacks
    def test_idp_down_at_start(self):
        issuer = self.issuer()
        self.server.failing = True
        error = yield self.refused(issuer.authenticate(self.token()), "idp_unavailable")
        self.assertIn("503", error.reason)
        yield self.refused(issuer.authenticate(self.token()), "idp_unavailable")
        self.assertEqual(self.server.discovery_fetches, 1)

    @inlineCallbacks
    def test_refresh_service_schedule(self):
        issuer = self.issuer(jwks_refresh=100, kid_refetch_interval=10)
        service = issuer.service()
        service.startService()
        self.addCleanup(service.stopService)
        yield issuer.refresh()        # joins the fetch the service started
        self.assertEqual(self.server.jwks_fetches, 1)
        self.clock.advance(99)
        self.assertEqual(issuer.fetches, 1)
        self.clock.advance(1)
        yield issuer.refresh()
        self.assertEqual(self.server.jwks_fetches, 2)
        self.server.failing = True
        self.clock.advance(100)
        self.assertIsNotNone((yield issuer.refresh()))
        self.server.failing = False
        self.clock.advance(10)        # after a failure the retry comes sooner
        self.assertIsNone((yield issuer.refresh()))
        self.assertEqual(self.server.jwks_fetches, 3)

    @inlineCallbacks
    def test_untrusted_certificate(self):
        issuer = self.issuer(ca_pem=__import__("arc.pki").pki.new_ca("other")[0])
        outcome = yield issuer.refresh()
        self.assertIn("TLS", outcome)
        self.assertIn("ca_file", outcome)

    @inlineCallbacks
    def test_redirect_not_followed(self):
        issuer = self.issuer()
        self.server.override("jwks", 302, headers={"Location": self.server.url + "/moved"})
        outcome = yield issuer.refresh()
        self.assertIn("redirect", outcome)
        self.assertIn("not followed", outcome)
        self.assertIsNone(issuer.keys)

    @inlineCallbacks
    def test_document_size_capped(self):
        issuer = self.issuer(max_document_size=200)
        outcome = yield issuer.refresh()
        self.assertIn("max_document_size", outcome)

    @inlineCallbacks
    def test_discovery_issuer_must_match(self):
        issuer = self.issuer()
        document = self.server.discovery_document()
        document["issuer"] = self.server.url + "/"
        self.server.override("discovery", 200, document)
        outcome = yield issuer.refresh()
        self.assertIn("must match exactly", outcome)

    @inlineCallbacks
    def test_jwks_uri_must_be_https(self):
        issuer = self.issuer()
        document = self.server.discovery_document()
        document["jwks_uri"] = document["jwks_uri"].replace("https:", "http:")
        self.server.override("discovery", 200, document)
        outcome = yield issuer.refresh()
        self.assertIn("https://", outcome)
        self.assertEqual(self.server.jwks_fetches, 0)

    @inlineCallbacks
    def test_jwks_without_usable_keys(self):
        issuer = self.issuer()
        self.server.override("jwks", 200, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
        outcome = yield issuer.refresh()
        self.assertIn("no usable signing key", outcome)


class _Silent(Protocol):
    """Accepts a connection and never answers."""

    def connectionMade(self):
        self.factory.open.append(self)

    def connectionLost(self, reason):
        self.factory.open.remove(self)


class FetcherTests(TestCase):

    @inlineCallbacks
    def test_timeout(self):
        factory = Factory.forProtocol(_Silent)
        factory.open = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        fetcher = DocumentFetcher(reactor, timeout=0.2)
        self.addCleanup(fetcher.close)
        url = "https://127.0.0.1:%d/jwks" % (port.getHost().port,)
        error = yield self.assertFailure(fetcher.get_json(url), FetchError)
        self.assertIn("did not answer within", str(error))

    def test_http_refused(self):
        fetcher = DocumentFetcher(Clock())
        self.failureResultOf(fetcher.get_json("http://idp.example.com/jwks"), FetchError)

    def test_body_capped_while_reading(self):
        class Transport:
            stopped = False

            def stopProducing(self):
                self.stopped = True

        reader = _CappedReader(10, "https://idp/jwks")
        reader.makeConnection(Transport())
        reader.dataReceived(b"12345")
        reader.dataReceived(b"678901")
        self.assertTrue(reader.transport.stopped)
        self.assertNoResult(reader.done)
        reader.dataReceived(b"more")
        reader.connectionLost(Failure(ResponseDone()))
        failure = self.failureResultOf(reader.done, FetchError)
        self.assertIn("larger than 10 bytes", str(failure.value))


class AuthenticatorTests(LiveIssuerTestCase):

    def authenticator(self, passthrough):
        static = StaticTokens({"ci": (token_digest(STATIC_TOKEN), ("deployers",))})
        self.remember(STATIC_TOKEN)
        return Authenticator(static, [self.issuer()], passthrough)

    @inlineCallbacks
    def test_static_first(self):
        auth = self.authenticator(False)
        principal = yield auth.authenticate(STATIC_TOKEN)
        self.assertEqual((principal.username, principal.method), ("ci", "static"))

    @inlineCallbacks
    def test_oidc(self):
        auth = self.authenticator(False)
        principal = yield auth.authenticate(self.token())
        self.assertEqual(principal.method, "oidc")

    @inlineCallbacks
    def test_passthrough_enabled(self):
        auth = self.authenticator(True)
        opaque = self.remember("sha256~opaque-kubernetes-token-value-1234")
        self.assertIs((yield auth.authenticate(opaque)), PASSTHROUGH)
        foreign = self.token({"iss": "https://kubernetes.default.svc.cluster.local"})
        self.assertIs((yield auth.authenticate(foreign)), PASSTHROUGH)
        self.assertEqual(self.server.jwks_fetches, 0)

    @inlineCallbacks
    def test_passthrough_disabled(self):
        auth = self.authenticator(False)
        opaque = self.remember("sha256~opaque-kubernetes-token-value-1234")
        yield self.refused(auth.authenticate(opaque), "unknown_token")
        foreign = self.token({"iss": "https://kubernetes.default.svc.cluster.local"})
        error = yield self.refused(auth.authenticate(foreign), "unknown_token")
        self.assertIn(self.server.url, error.reason)
        yield self.refused(auth.authenticate(""), "missing")

    @inlineCallbacks
    def test_our_issuer_but_invalid_is_refused_even_with_passthrough(self):
        auth = self.authenticator(True)
        yield self.refused(auth.authenticate(self.token({"aud": "other"})), "wrong_audience")
        yield self.refused(auth.authenticate(self.token(alg="none")), "bad_algorithm")
        yield self.refused(auth.authenticate(self.token(ttl=-3600)), "expired")

    @inlineCallbacks
    def test_lookalike_issuer_not_routed_to_ours(self):
        """A token claiming https://idp...evil is not ours: never verified with our keys."""
        auth = self.authenticator(False)
        token = self.token({"iss": self.server.url + ".evil"})
        yield self.refused(auth.authenticate(token), "unknown_token")
        self.assertEqual(self.server.jwks_fetches, 0)


class IssuerRoutingTests(NoTokenLeaks, SynchronousTestCase):
    """Issuer string checks that need no network: the fetcher must not be used."""

    class _NoFetch:
        def get_json(self, url):
            raise AssertionError("fetched %s" % (url,))

        def close(self):
            pass

    def setUp(self):
        self.watch_logs()
        self.ring = KeyRing()
        self.ring.add("RS256")
        self.issuer = OIDCIssuer(settings(), clock=Clock(), fetcher=self._NoFetch())

    def test_prefix_and_suffix_issuers(self):
        for iss in ("https://idp.example.com.evil", "https://idp.example.com/",
                    "https://idp.example.co", "http://idp.example.com", "HTTPS://IDP.EXAMPLE.COM"):
            token = self.remember(self.ring.mint(iss, NOW, claims(iss=iss)))
            failure = self.failureResultOf(self.issuer.authenticate(token), AuthError)
            self.assert_refused(failure.value, "wrong_issuer")

    def test_authenticator_routes_by_exact_issuer(self):
        auth = Authenticator(None, [self.issuer], passthrough=True)
        evil = "https://idp.example.com.evil"
        token = self.remember(self.ring.mint(evil, NOW, claims(iss=evil)))
        self.assertIs(self.successResultOf(auth.authenticate(token)), PASSTHROUGH)

"""The authenticator remembers verified ID tokens briefly, never past their exp."""

import base64
import json

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from arc.identity.authenticator import Authenticator
from arc.identity.model import AuthError, Principal

ISSUER = "https://idp.example.com"


def jwt_like(claims):
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return "%s.%s.%s" % (part({"alg": "RS256", "kid": "k"}), part(claims), "c2ln")


class FakeIssuer:
    issuer = ISSUER

    def __init__(self):
        self.clock = Clock()
        self.calls = 0
        self.error = None

    def authenticate(self, token):
        self.calls += 1
        if self.error:
            return fail(self.error)
        return succeed(Principal("alice", ("dev",), {}, ISSUER, "alice", "oidc"))

    def service(self):
        return None


class CacheTests(unittest.TestCase):
    def setUp(self):
        self.issuer = FakeIssuer()
        self.auth = Authenticator(None, [self.issuer], False)

    def principal(self, token):
        return self.successResultOf(self.auth.authenticate(token))

    def test_second_use_is_served_from_the_cache(self):
        token = jwt_like({"iss": ISSUER, "exp": 1000})
        self.assertEqual(self.principal(token).username, "alice")
        self.assertEqual(self.principal(token).username, "alice")
        self.assertEqual(self.issuer.calls, 1)

    def test_cache_entry_ends_at_exp(self):
        token = jwt_like({"iss": ISSUER, "exp": 10})
        self.principal(token)
        self.issuer.clock.advance(11)
        self.issuer.error = AuthError("expired", "the token expired")
        failure = self.failureResultOf(self.auth.authenticate(token), AuthError)
        self.assertEqual(failure.value.code, "expired")
        self.assertEqual(self.issuer.calls, 2)

    def test_cache_entry_ends_after_cache_seconds(self):
        token = jwt_like({"iss": ISSUER, "exp": 100000})
        self.principal(token)
        self.issuer.clock.advance(self.auth.cache_seconds + 1)
        self.principal(token)
        self.assertEqual(self.issuer.calls, 2)

    def test_failures_are_not_cached(self):
        token = jwt_like({"iss": ISSUER, "exp": 1000})
        self.issuer.error = AuthError("bad_signature", "signature does not verify")
        self.failureResultOf(self.auth.authenticate(token), AuthError)
        self.failureResultOf(self.auth.authenticate(token), AuthError)
        self.assertEqual(self.issuer.calls, 2)

    def test_cache_is_bounded(self):
        self.auth.cache_size = 50
        for i in range(200):
            self.principal(jwt_like({"iss": ISSUER, "exp": 1000, "n": i}))
        self.assertLessEqual(len(self.auth._verified), 50)


class VerdictTests(unittest.TestCase):
    """verdict() answers without a Deferred whenever the answer is known at once."""

    def setUp(self):
        self.issuer = FakeIssuer()

    def test_cached_token_static_token_and_passthrough(self):
        from arc.identity.authenticator import PASSTHROUGH
        from arc.identity.static import StaticTokens
        from arc.relay.registry import token_digest
        static = StaticTokens({"ci": (token_digest("ci-token-0123456789"), ("ci",))})
        auth = Authenticator(static, [self.issuer], True)
        token = jwt_like({"iss": ISSUER, "exp": 1000})
        first = auth.verdict(token)
        self.assertEqual(self.successResultOf(first).username, "alice")
        self.assertEqual(auth.verdict(token).username, "alice")
        self.assertEqual(self.issuer.calls, 1)
        self.assertEqual(auth.verdict("ci-token-0123456789").username, "ci")
        self.assertIs(auth.verdict("not-a-jwt"), PASSTHROUGH)

    def test_refusals_known_at_once_raise(self):
        auth = Authenticator(None, [self.issuer], False)
        for token in ("", "not-a-jwt", jwt_like({"iss": "https://other.example.com"})):
            self.assertRaises(AuthError, auth.verdict, token)
        self.failureResultOf(auth.authenticate("not-a-jwt"), AuthError)

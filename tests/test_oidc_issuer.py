"""Tests for the local OIDC issuer used by the identity tests (L{arc.testing.oidc}).

The issuer runs in the test's reactor on 127.0.0.1 (port 0) and is read with
a real HTTPS client that trusts only its CA and offers ALPN, as curl and
kubectl do; the command line runs as a child process.
"""

import json
import os
import sys

import jwt
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from arc.testing.oidc import KeyRing, OIDCIssuerServer, main
from arc.tls import client_options

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@implementer(IPolicyForHTTPS)
class _TrustCA:
    def __init__(self, ca_pem):
        self.ca_pem = ca_pem

    def creatorForNetloc(self, hostname, port):
        return client_options(hostname.decode("ascii"), ca_pem=self.ca_pem)


class IssuerTestCase(TestCase):
    """Starts an issuer; ``self.get(path)`` fetches from it over verified HTTPS."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.server = OIDCIssuerServer(clock=self.clock)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, contextFactory=_TrustCA(
            self.server.ca_pem), pool=pool))
        self.addCleanup(self.server.stop)
        return self.server.start()

    @inlineCallbacks
    def get(self, url):
        response = yield self.http.get(url, allow_redirects=False)
        body = yield response.content()
        return response.code, body


class DiscoveryAndJWKSTests(IssuerTestCase):

    @inlineCallbacks
    def test_discovery_document(self):
        """The discovery document names the issuer URL exactly and an https jwks_uri."""
        code, body = yield self.get(self.server.url + "/.well-known/openid-configuration")
        self.assertEqual(code, 200)
        document = json.loads(body)
        self.assertEqual(document["issuer"], self.server.url)
        self.assertTrue(self.server.url.startswith("https://127.0.0.1:"))
        self.assertTrue(self.server.url.endswith("/realm"))
        self.assertEqual(document["jwks_uri"], self.server.url + "/jwks")
        self.assertEqual(document["id_token_signing_alg_values_supported"], ["ES256", "RS256"])
        self.assertEqual(self.server.discovery_fetches, 1)

    @inlineCallbacks
    def test_jwks_shape(self):
        """The JWKS holds one public RSA and one public EC signing key, with kid and alg."""
        code, body = yield self.get(self.server.url + "/jwks")
        self.assertEqual(code, 200)
        keys = json.loads(body)["keys"]
        self.assertEqual(sorted(k["kty"] for k in keys), ["EC", "RSA"])
        for key in keys:
            self.assertEqual(key["use"], "sig")
            self.assertIn(key["alg"], ("RS256", "ES256"))
            self.assertTrue(key["kid"])
            self.assertNotIn("d", key, "private part published")
        self.assertEqual(self.server.jwks_fetches, 1)

    @inlineCallbacks
    def test_minted_token_verifies_with_published_key(self):
        """A minted token verifies with the JWK of its kid; iss, iat, exp are filled in."""
        _, body = yield self.get(self.server.url + "/jwks")
        keys = {k["kid"]: k for k in json.loads(body)["keys"]}
        for alg in ("RS256", "ES256"):
            token = self.server.mint({"sub": "alice", "aud": "arc"}, alg=alg)
            kid = jwt.get_unverified_header(token)["kid"]
            claims = jwt.decode(token, key=jwt.PyJWK(keys[kid]), algorithms=[alg],
                                audience="arc", options={"verify_exp": False,
                                                         "verify_iat": False})
            self.assertEqual(claims["iss"], self.server.url)
            self.assertEqual(claims["iat"], 1_700_000_000)
            self.assertEqual(claims["exp"], 1_700_003_600)

    @inlineCallbacks
    def test_rotation(self):
        """rotate() publishes a new current key and removes the old one."""
        old = self.server.key().kid
        new = self.server.rotate()
        self.assertNotEqual(old, new)
        _, body = yield self.get(self.server.url + "/jwks")
        kids = [k["kid"] for k in json.loads(body)["keys"]]
        self.assertIn(new, kids)
        self.assertNotIn(old, kids)
        token = self.server.mint({"sub": "a"})
        self.assertEqual(jwt.get_unverified_header(token)["kid"], new)
        retired = self.server.mint({"sub": "a"}, kid=old)
        self.assertEqual(jwt.get_unverified_header(retired)["kid"], old)

    @inlineCallbacks
    def test_failure_switch(self):
        """With ``failing`` set every endpoint answers 503; requests are still counted."""
        self.server.failing = True
        code, _ = yield self.get(self.server.url + "/jwks")
        self.assertEqual(code, 503)
        code, _ = yield self.get(self.server.url + "/.well-known/openid-configuration")
        self.assertEqual(code, 503)
        self.assertEqual(self.server.jwks_fetches, 1)
        self.server.failing = False
        code, _ = yield self.get(self.server.url + "/jwks")
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_override(self):
        """An override replaces one endpoint's answer until cleared."""
        self.server.override("jwks", 302, headers={"Location": "https://elsewhere/"})
        code, _ = yield self.get(self.server.url + "/jwks")
        self.assertEqual(code, 302)
        self.server.clear_overrides()
        code, _ = yield self.get(self.server.url + "/jwks")
        self.assertEqual(code, 200)

    def test_attack_tokens(self):
        """alg none and HS256 tokens can be minted for negative tests."""
        none = self.server.mint({"sub": "a"}, alg="none")
        self.assertTrue(none.endswith("."))
        self.assertEqual(jwt.get_unverified_header(none)["alg"], "none")
        hs = self.server.mint({"sub": "a"}, alg="HS256", key=self.server.public_pem())
        self.assertEqual(jwt.get_unverified_header(hs)["alg"], "HS256")
        unkeyed = self.server.mint({"sub": "a"}, headers={"kid": None})
        self.assertNotIn("kid", jwt.get_unverified_header(unkeyed))

    @inlineCallbacks
    def test_extra_endpoint(self):
        """add_endpoint serves a new path and lists it in the discovery document."""
        from arc.testing.oidc import Endpoint

        class Hello(Endpoint):
            def answer(self, request):
                return 200, {"hello": "world"}

        self.server.add_endpoint("protocol/token", Hello(self.server, "token"),
                                 metadata="token_endpoint")
        code, body = yield self.get(self.server.url + "/protocol/token")
        self.assertEqual((code, json.loads(body)), (200, {"hello": "world"}))
        _, body = yield self.get(self.server.url + "/.well-known/openid-configuration")
        self.assertEqual(json.loads(body)["token_endpoint"], self.server.url + "/protocol/token")


class KeyRingTests(SynchronousTestCase):

    def test_saved_and_loaded(self):
        """A ring saved to a file loads with the same keys and current kids."""
        path = os.path.join(self.mktemp() + "-keys.json")
        ring = KeyRing(path)
        kid = ring.add("ES256")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        loaded = KeyRing.load(path)
        self.assertEqual(loaded.current, {"ES256": kid})
        self.assertEqual(loaded.key(kid).public_pem(), ring.key(kid).public_pem())
        self.assertIsNone(KeyRing.load(path + ".absent"))


class _Child(ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = Deferred()
        self._lines = []

    def outReceived(self, data):
        self.out += data
        if b"\n" in self.out:
            waiting, self._lines = self._lines, []
            for d in waiting:
                d.callback(self.out)

    def errReceived(self, data):
        self.err += data

    def first_line(self):
        d = Deferred()
        if b"\n" in self.out:
            d.callback(self.out)
        else:
            self._lines.append(d)
        return d

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class CommandLineTests(TestCase):
    timeout = 60

    def spawn(self, *args):
        child = _Child()
        env = dict(os.environ, PYTHONPATH=PROJECT)
        process = reactor.spawnProcess(child, sys.executable,
                                       [sys.executable, "-m", "arc.testing.oidc", *args],
                                       env=env, path=PROJECT)
        return child, process

    @inlineCallbacks
    def test_serve_and_mint_round_trip(self):
        """The served JWKS verifies a token minted by a second process from the state dir."""
        state = os.path.abspath(self.mktemp())
        child, process = self.spawn("--state-dir", state, "--listen",
                                    "tcp:0:interface=127.0.0.1")

        def stop():
            if child.ended.called:
                return None
            process.signalProcess("TERM")
            return child.ended

        self.addCleanup(stop)
        line = yield child.first_line()
        self.assertIn(b"oidc issuer listening on https://127.0.0.1:", line)
        with open(os.path.join(state, "url")) as f:
            url = f.read().strip()
        with open(os.path.join(state, "ca.crt"), "rb") as f:
            ca_pem = f.read()
        minter, _ = self.spawn("--state-dir", state, "mint", "--sub", "alice", "--groups",
                               "dev,ops", "--aud", "arc", "--ttl", "600")
        code = yield minter.ended
        self.assertEqual(code, 0, minter.err)
        token = minter.out.decode("ascii").strip()
        http = treq.client.HTTPClient(Agent(reactor, contextFactory=_TrustCA(ca_pem),
                                            pool=HTTPConnectionPool(reactor, persistent=False)))
        response = yield http.get(url + "/jwks")
        keys = {k["kid"]: k for k in (yield response.json())["keys"]}
        kid = jwt.get_unverified_header(token)["kid"]
        claims = jwt.decode(token, key=jwt.PyJWK(keys[kid]), algorithms=["RS256"],
                            audience="arc", issuer=url)
        self.assertEqual(claims["sub"], "alice")
        self.assertEqual(claims["groups"], ["dev", "ops"])
        self.assertEqual(claims["exp"] - claims["iat"], 600)
        yield stop()

    def test_mint_without_state_fails_clearly(self):
        """mint on an empty state dir says what to do."""
        state = self.mktemp()
        os.makedirs(state)
        with self.assertRaises(SystemExit) as caught:
            main(["--state-dir", state, "mint", "--sub", "a"])
        self.assertIn("start the issuer", str(caught.exception))

    def test_usage_errors(self):
        """A missing --state-dir or --sub is a usage error (exit 2)."""
        self.patch(sys, "stderr", open(os.devnull, "w"))
        self.addCleanup(sys.stderr.close)
        self.assertEqual(main([]), 2)
        self.assertEqual(main(["--state-dir", "x", "mint"]), 2)

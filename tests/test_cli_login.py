"""Tests for ``arc login``, ``arc logout`` and ``arc token``.

A real OIDC issuer (:mod:`arc.testing.oidc` with its login endpoints) runs
over TLS on 127.0.0.1 in the test's reactor.  The CLI uses blocking HTTP, so
it runs either as a child process (``python -m arc.cli.main``, spawned
without blocking the reactor) or, for in-process calls, in a thread.  Every
wait is bounded.
"""

import base64
import hashlib
import json
import os
import re
import stat
import sys
from argparse import Namespace
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from arc.cli import login as login_cli
from arc.cli import oidcclient, tokencache
from arc.cli import token as token_cli
from arc.cli.main import CommandError
from arc.errors import ConfigError
from arc.testing.oidc import OIDCIssuerServer
from arc.tls import client_options

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXEC_V1 = "client.authentication.k8s.io/v1"


@implementer(IPolicyForHTTPS)
class _TrustCA:
    def __init__(self, ca_pem):
        self.ca_pem = ca_pem

    def creatorForNetloc(self, hostname, port):
        return client_options(hostname.decode("ascii"), ca_pem=self.ca_pem)


# A browser for $BROWSER: prints to its stdout, then follows the login in the
# foreground as a terminal browser would.
FAKE_BROWSER = """#!%(python)s
import ssl, sys, urllib.error, urllib.request
print("noise from the browser", flush=True)


class Stay(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


opener = urllib.request.build_opener(
    urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile="%(ca)s")), Stay())
try:
    opener.open(sys.argv[1], timeout=10)
except urllib.error.HTTPError as e:
    location = e.headers["Location"]
urllib.request.urlopen(location, timeout=10).read()
"""


class _ArcProcess(ProcessProtocol):
    """Collects a child's output; ``done`` fires with its exit code."""

    def __init__(self, on_stderr=None):
        self.out = []
        self.err = []
        self.on_stderr = on_stderr
        self.done = Deferred()

    def connectionMade(self):
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)
        if self.on_stderr is not None:
            self.on_stderr(b"".join(self.err).decode("utf-8", "replace"))

    def processEnded(self, reason):
        self.done.callback(reason.value.exitCode)


class LoginTestCase(TestCase):
    """An issuer with login endpoints, a private config dir, and ways to run arc."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.config_dir = os.path.join(self.base, "arc")
        previous = os.environ.get("ARC_CONFIG_DIR")
        os.environ["ARC_CONFIG_DIR"] = self.config_dir

        def restore():
            if previous is None:
                os.environ.pop("ARC_CONFIG_DIR", None)
            else:
                os.environ["ARC_CONFIG_DIR"] = previous

        self.addCleanup(restore)
        self.said = []
        self.patch(login_cli, "say", self.said.append)
        self.server = OIDCIssuerServer()
        self.flows = self.server.enable_login(client_id="arc", interval=1, claims={
            "sub": "alice", "email": "alice@example.com", "groups": ["dev", "ops"]})
        self.addCleanup(self.server.stop)
        self.issuer = yield self.server.start()
        self.ca_file = os.path.join(self.base, "idp-ca.crt")
        with open(self.ca_file, "wb") as f:
            f.write(self.server.ca_pem)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.https = treq.client.HTTPClient(Agent(reactor, contextFactory=_TrustCA(
            self.server.ca_pem), pool=pool))
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def env(self, **extra):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": PROJECT,
               "HOME": self.base, "ARC_CONFIG_DIR": self.config_dir, "LANG": "C.UTF-8"}
        env.update(extra)
        return env

    def arc(self, *args, env=None, timeout=30, on_stderr=None):
        """Run ``arc ARGS`` as a child; a Deferred ``(exit code, stdout, stderr)``."""
        proto = _ArcProcess(on_stderr)
        process = reactor.spawnProcess(proto, sys.executable,
                                       [sys.executable, "-m", "arc.cli.main"] + list(args),
                                       env=env or self.env(), path=self.base)
        killer = reactor.callLater(timeout, process.signalProcess, "KILL")

        def ended(code):
            if killer.active():
                killer.cancel()
            return (code, b"".join(proto.out).decode("utf-8"),
                    b"".join(proto.err).decode("utf-8"))

        return proto.done.addCallback(ended)

    def profile(self, name="default", **changes):
        settings = tokencache.Profile(name, issuer=self.issuer, client_id="arc",
                                      ca_file=self.ca_file)
        for key, value in changes.items():
            setattr(settings, key, value)
        return settings

    @inlineCallbacks
    def log_in(self, name="default"):
        """Log in with the device flow in a thread (no real waiting); the saved record."""
        clock = [1000.0]

        def sleep(seconds):
            clock[0] += seconds

        profile = self.profile(name)
        tokencache.save_profile(profile, tokencache.config_path())
        record = yield deferToThread(login_cli.login, profile, flow="device", sleep=sleep,
                                     clock=lambda: clock[0])
        tokencache.TokenCache(name).save(record)
        return record

    def cached(self, name="default"):
        return tokencache.TokenCache(name).load()

    def assertNoSecrets(self, text, *records):
        for record in records:
            for key in ("id_token", "refresh_token"):
                if record.get(key):
                    self.assertNotIn(record[key], text)


class DeviceLoginTests(LoginTestCase):

    @inlineCallbacks
    def test_device_login(self):
        """``arc login --device``: code shown, pending then approved; tokens cached privately."""
        self.flows.pending = 1
        code, out, err = yield self.arc("login", "--device", "--issuer", self.issuer,
                                        "--client-id", "arc", "--ca-file", self.ca_file)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.flows.grants, [(oidcclient.DEVICE_GRANT, "authorization_pending"),
                                             (oidcclient.DEVICE_GRANT, "ok")])
        self.assertRegex(err, r"open %s/device/verify and enter the code \d{4}-\d{4}"
                         % (re.escape(self.issuer),))
        self.assertIn("user_code=", err)
        self.assertIn("Logged in to %s as alice@example.com (groups: dev, ops)" % (self.issuer,),
                      out)
        record = self.cached()
        self.assertEqual(record["issuer"], self.issuer)
        self.assertEqual(record["client_id"], "arc")
        self.assertEqual(record["expiry"], tokencache.jwt_expiry(record["id_token"]))
        self.assertTrue(record["refresh_token"])
        self.assertNoSecrets(out + err, record)
        path = tokencache.cache_path("default")
        self.assertEqual(path, os.path.join(self.config_dir, "tokens", "default.json"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        saved = tokencache.load_profile("default", tokencache.config_path())
        self.assertEqual((saved.issuer, saved.client_id, saved.ca_file),
                         (self.issuer, "arc", self.ca_file))
        # The next login needs no flags: the profile has the settings.
        self.flows.pending = 0
        code, out, err = yield self.arc("login", "--device")
        self.assertEqual(code, 0, err)
        self.assertNotEqual(self.cached()["id_token"], record["id_token"])

    @inlineCallbacks
    def test_polling_honours_interval_and_slow_down(self):
        """Polls wait ``interval``, five seconds more after ``slow_down``, until approval."""
        self.flows.interval = 5
        self.flows.pending = 2
        self.flows.slow_down = True
        waits = []
        record = yield deferToThread(login_cli.login, self.profile(), flow="device",
                                     sleep=waits.append, clock=lambda: sum(waits))
        self.assertEqual(waits, [5, 10, 10, 10])
        self.assertEqual([outcome for _, outcome in self.flows.grants],
                         ["slow_down", "authorization_pending", "authorization_pending", "ok"])
        self.assertEqual(tokencache.jwt_claims(record["id_token"])["aud"], "arc")
        self.assertTrue(any("enter the code" in line for line in self.said))

    @inlineCallbacks
    def test_refused(self):
        """The user refusing ends the login with access_denied and the fix."""
        self.flows.approve = False
        waits = []
        d = deferToThread(login_cli.login, self.profile(), flow="device", sleep=waits.append,
                          clock=lambda: sum(waits))
        error = yield self.assertFailure(d, CommandError)
        self.assertIn("the login was refused at the identity provider (access_denied)",
                      str(error))
        self.assertIn('run "arc login --profile default" again', str(error))

    @inlineCallbacks
    def test_code_expires(self):
        """Polling stops once ``expires_in`` has passed, with a clear message."""
        self.flows.pending = 1000
        self.flows.device_ttl = 20
        self.flows.interval = 5
        waits = []
        d = deferToThread(login_cli.login, self.profile(), flow="device", sleep=waits.append,
                          clock=lambda: sum(waits))
        error = yield self.assertFailure(d, CommandError)
        self.assertIn("the login code expired", str(error))
        self.assertEqual(waits, [5, 5, 5, 5])


class BrowserLoginTests(LoginTestCase):

    @inlineCallbacks
    def test_browser_login(self):
        """Authorization code + PKCE: the test is the browser that follows the redirect."""
        seen = Deferred()

        def on_stderr(text):
            match = re.search(r"(https://127\.0\.0\.1:\d+/realm/authorize\?\S+)", text)
            if match and not seen.called:
                seen.callback(match.group(1))

        running = self.arc("login", "--browser", "--no-browser", "--issuer", self.issuer,
                           "--client-id", "arc", "--ca-file", self.ca_file, "--profile", "web",
                           on_stderr=on_stderr)
        url = yield seen
        query = parse_qs(urlsplit(url).query)
        self.assertEqual(query["code_challenge_method"], ["S256"])
        self.assertEqual(query["response_type"], ["code"])
        self.assertRegex(query["redirect_uri"][0], r"^http://127\.0\.0\.1:\d+/callback$")
        self.assertNotIn("code_verifier", query)

        response = yield self.https.get(url, allow_redirects=False)
        yield response.content()
        self.assertEqual(response.code, 302)
        location = response.headers.getRawHeaders(b"location")[0].decode("ascii")
        self.assertTrue(location.startswith(query["redirect_uri"][0] + "?"))

        # An answer with another state is refused; the listener keeps waiting.
        parts = urlsplit(location)
        forged = dict((k, v[0]) for k, v in parse_qs(parts.query).items())
        forged["state"] = "not-the-state"
        response = yield self.http.get(urlunsplit(parts._replace(query=urlencode(forged))))
        page = yield response.text()
        self.assertEqual(response.code, 400)
        self.assertIn("state does not match", page)

        response = yield self.http.get(location)
        page = yield response.text()
        self.assertEqual(response.code, 200)
        self.assertIn("you can close this window", page)

        code, out, err = yield running
        self.assertEqual(code, 0, err)
        self.assertEqual(self.flows.grants, [("authorization_code", "ok")])
        record = self.cached("web")
        claims = tokencache.jwt_claims(record["id_token"])
        self.assertEqual((claims["sub"], claims["aud"]), ("alice", "arc"))
        self.assertEqual(claims["nonce"], query["nonce"][0])
        self.assertNoSecrets(out + err, record)

    @inlineCallbacks
    def test_wrong_verifier_rejected(self):
        """The issuer refuses a code redeemed with another PKCE verifier (invalid_grant)."""
        provider = oidcclient.Provider(self.issuer, ca_file=self.ca_file)
        redirect_uri = "http://127.0.0.1:9/callback"
        endpoint = yield deferToThread(provider.require, "authorization_endpoint", "-")

        @inlineCallbacks
        def code_for(challenge):
            url = login_cli.authorization_url(endpoint, "arc", redirect_uri, "openid", "s1",
                                              "n1", challenge)
            response = yield self.https.get(url, allow_redirects=False)
            yield response.content()
            self.assertEqual(response.code, 302)
            location = response.headers.getRawHeaders(b"location")[0].decode("ascii")
            return parse_qs(urlsplit(location).query)["code"][0]

        verifier, challenge = oidcclient.pkce_pair()
        code = yield code_for(challenge)
        other, _ = oidcclient.pkce_pair()
        d = deferToThread(provider.exchange_code, "arc", code, redirect_uri, other)
        error = yield self.assertFailure(d, oidcclient.GrantError)
        self.assertEqual(error.error, "invalid_grant")
        self.assertIn("PKCE verification failed", str(error))
        # The right verifier works on a fresh code.
        code = yield code_for(challenge)
        answer = yield deferToThread(provider.exchange_code, "arc", code, redirect_uri,
                                     verifier)
        self.assertTrue(answer["id_token"])

    @inlineCallbacks
    def test_refused_in_browser(self):
        """A refusal at the provider comes back through the redirect and is reported."""
        self.flows.approve = False

        def browse(url):
            d = self.https.get(url, allow_redirects=False)
            d.addCallback(lambda r: self.http.get(
                r.headers.getRawHeaders(b"location")[0].decode("ascii")))
            d.addCallback(treq.content)

        self.patch(login_cli, "say", lambda text: self._maybe_browse(text, browse))
        d = deferToThread(login_cli.login, self.profile(), flow="browser", launch_browser=False,
                          timeout=20)
        error = yield self.assertFailure(d, CommandError)
        self.assertIn("the identity provider refused the login (access_denied", str(error))

    def _maybe_browse(self, text, browse):
        match = re.search(r"(https://\S+/authorize\?\S+)", text)
        if match:
            reactor.callFromThread(browse, match.group(1))


class TokenTests(LoginTestCase):

    @inlineCallbacks
    def test_exec_credential(self):
        """``arc token`` prints the cached ID token as a v1 ExecCredential, without HTTP."""
        record = yield self.log_in()
        before = dict(self.server.requests)
        code, out, err = yield self.arc("token")
        self.assertEqual((code, err), (0, ""))
        credential = json.loads(out)
        self.assertEqual(credential, {
            "apiVersion": EXEC_V1, "kind": "ExecCredential",
            "status": {"token": record["id_token"],
                       "expirationTimestamp": tokencache.rfc3339(record["expiry"])}})
        self.assertRegex(credential["status"]["expirationTimestamp"],
                         r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(self.server.requests, before)

    @inlineCallbacks
    def test_v1beta1_when_asked(self):
        """kubectl configured for v1beta1 gets a v1beta1 answer."""
        yield self.log_in()
        info = json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1",
                           "kind": "ExecCredential", "spec": {"interactive": False}})
        code, out, err = yield self.arc("token", env=self.env(KUBERNETES_EXEC_INFO=info))
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["apiVersion"], "client.authentication.k8s.io/v1beta1")

    @inlineCallbacks
    def test_refresh_before_expiry(self):
        """A token expiring within --min-validity is refreshed first; the cache follows."""
        self.flows.ttl = 30
        first = yield self.log_in()
        code, out, err = yield self.arc("token")
        self.assertEqual((code, err), (0, ""))
        printed = json.loads(out)["status"]["token"]
        self.assertNotEqual(printed, first["id_token"])
        self.assertEqual(self.flows.grants[-1], ("refresh_token", "ok"))
        record = self.cached()
        self.assertEqual(record["id_token"], printed)
        self.assertNotEqual(record["refresh_token"], first["refresh_token"])
        self.assertEqual(stat.S_IMODE(os.stat(tokencache.cache_path()).st_mode), 0o600)
        # With a lower bar, the fresh token is served as it is.
        grants = len(self.flows.grants)
        code, out, err = yield self.arc("token", "--min-validity", "5")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["status"]["token"], printed)
        self.assertEqual(len(self.flows.grants), grants)

    @inlineCallbacks
    def test_parallel_runs_refresh_in_turn(self):
        """Parallel runs take turns, so each uses the latest rotated refresh token."""
        self.flows.ttl = 30
        yield self.log_in()
        results = yield gatherResults([self.arc("token") for _ in range(4)])
        for code, out, err in results:
            self.assertEqual((code, err), (0, ""))
        self.assertEqual([g for g in self.flows.grants if g[0] == "refresh_token"],
                         [("refresh_token", "ok")] * 4)
        tokens = {json.loads(out)["status"]["token"] for _, out, _ in results}
        self.assertEqual(len(tokens), 4)
        self.assertIn(self.cached()["id_token"], tokens)

    @inlineCallbacks
    def test_refresh_failure(self):
        """A refused refresh token: exit 1, one line with the cause and the fix."""
        self.flows.ttl = 30
        yield self.log_in()
        self.flows.revoke_refresh_tokens()
        code, out, err = yield self.arc("token")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("arc token: cannot refresh the token of profile default: "
                                       "the identity provider refused the request "
                                       "(invalid_grant"), err)
        self.assertTrue(err.endswith('; run "arc login --profile default"\n'), err)

    @inlineCallbacks
    def test_provider_down_during_refresh(self):
        """An unreachable provider is named in the one-line failure."""
        self.flows.ttl = 30
        yield self.log_in()
        self.server.failing = True
        code, out, err = yield self.arc("token")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("answered HTTP 503", err)
        self.assertIn('run "arc login --profile default"', err)

    @inlineCallbacks
    def test_not_logged_in(self):
        """No cache: exit 1 with the one line naming the command to run."""
        code, out, err = yield self.arc("token", "--profile", "staging")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, 'arc token: not logged in: run "arc login --profile staging"\n')
        info = json.dumps({"apiVersion": EXEC_V1, "kind": "ExecCredential",
                           "spec": {"interactive": False}})
        code, out, err = yield self.arc("token", env=self.env(KUBERNETES_EXEC_INFO=info))
        self.assertEqual(err, 'arc token: not logged in: run "arc login --profile default"\n')

    @inlineCallbacks
    def test_interactive_logs_in(self):
        """With spec.interactive, a missing login is done there and then (device code)."""
        tokencache.save_profile(self.profile(), tokencache.config_path())
        info = json.dumps({"apiVersion": EXEC_V1, "kind": "ExecCredential",
                           "spec": {"interactive": True}})
        code, out, err = yield self.arc("token", env=self.env(KUBERNETES_EXEC_INFO=info))
        self.assertEqual(code, 0, err)
        self.assertIn("enter the code", err)
        credential = json.loads(out)
        self.assertEqual(credential["status"]["token"], self.cached()["id_token"])

    @inlineCallbacks
    def test_interactive_browser_keeps_stdout_clean(self):
        """A browser started by ``arc token`` runs alongside and cannot write into the JSON."""
        browser = os.path.join(self.base, "browser")
        with open(browser, "w") as f:
            f.write(FAKE_BROWSER % {"python": sys.executable, "ca": self.ca_file})
        os.chmod(browser, 0o755)
        tokencache.save_profile(self.profile(), tokencache.config_path())
        info = json.dumps({"apiVersion": EXEC_V1, "kind": "ExecCredential",
                           "spec": {"interactive": True}})
        code, out, err = yield self.arc("token", env=self.env(KUBERNETES_EXEC_INFO=info,
                                                              BROWSER=browser))
        self.assertEqual(code, 0, err)
        self.assertIn("noise from the browser", err)
        self.assertEqual(json.loads(out)["status"]["token"], self.cached()["id_token"])
        self.assertEqual(self.flows.grants, [("authorization_code", "ok")])

    @inlineCallbacks
    def test_logout(self):
        """``arc logout`` deletes the cache and says so; then ``arc token`` is not logged in."""
        yield self.log_in()
        path = tokencache.cache_path()
        code, out, err = yield self.arc("logout")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Deleted the cached tokens of profile default (%s)" % (path,), out)
        self.assertFalse(os.path.exists(path))
        code, out, err = yield self.arc("logout")
        self.assertIn("nothing to delete", out)
        code, out, err = yield self.arc("token")
        self.assertEqual(err, 'arc token: not logged in: run "arc login --profile default"\n')

    @inlineCallbacks
    def test_fast_path_imports(self):
        """A valid cache is served with the standard library: no HTTP client, no Twisted.

        This checks the path of :mod:`arc.cli.token` itself; what ``arc``'s
        parser imports for the other commands is up to their modules.
        """
        yield self.log_in()
        script = ("import argparse, sys; from arc.cli import token; "
                  "parser = argparse.ArgumentParser(); token.add_arguments(parser); "
                  "code = token.run(parser.parse_args([])); "
                  "heavy = ('twisted', 'treq', 'yaml', 'cryptography', 'jwt', 'ssl', "
                  "'urllib.request', 'arc.cli.oidcclient', 'arc.cli.login'); "
                  "sys.stderr.write(' '.join(m for m in heavy if m in sys.modules)); "
                  "sys.exit(code)")
        proto = _ArcProcess()
        reactor.spawnProcess(proto, sys.executable, [sys.executable, "-c", script],
                             env=self.env(), path=self.base)
        code = yield proto.done
        err = b"".join(proto.err).decode()
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(b"".join(proto.out))["kind"], "ExecCredential")


class CITokenTests(LoginTestCase):

    @inlineCallbacks
    def test_from_file(self):
        jwt = self.server.mint({"sub": "ci", "aud": "arc"}, ttl=600)
        path = os.path.join(self.base, "token")
        with open(path, "w") as f:
            f.write(jwt + "\n")
        code, out, err = yield self.arc("token", "--from-file", path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out), {
            "apiVersion": EXEC_V1, "kind": "ExecCredential",
            "status": {"token": jwt,
                       "expirationTimestamp": tokencache.rfc3339(tokencache.jwt_expiry(jwt))}})

    @inlineCallbacks
    def test_from_env_opaque(self):
        """A token that is not a JWT is passed on without an expiry."""
        code, out, err = yield self.arc("token", "--from-env", "CI_TOKEN",
                                        env=self.env(CI_TOKEN="opaque-secret-123"))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["status"], {"token": "opaque-secret-123"})

    @inlineCallbacks
    def test_from_command(self):
        command = "%s -c \"print('from-a-command')\"" % (sys.executable,)
        code, out, err = yield self.arc("token", "--from-command", command)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["status"]["token"], "from-a-command")

    @inlineCallbacks
    def test_source_failures(self):
        """Missing, empty, failing or expired sources: one line each, no token shown."""
        expired = self.server.mint({"sub": "ci", "aud": "arc"}, ttl=-120)
        cases = [
            (["--from-env", "NOPE"], {}, "environment variable NOPE is not set"),
            (["--from-env", "EMPTY"], {"EMPTY": " "}, "environment variable EMPTY is empty"),
            (["--from-env", "OLD"], {"OLD": expired}, "expired 2 min ago; renew it"),
            (["--from-file", os.path.join(self.base, "missing")], {}, "cannot read the token"),
            (["--from-command", "%s -c 'import sys; sys.exit(3)'" % (sys.executable,)], {},
             "exited with status 3"),
            (["--from-command", "/nonexistent/tool"], {}, "/nonexistent/tool not found"),
        ]
        for args, extra, expected in cases:
            code, out, err = yield self.arc("token", *args, env=self.env(**extra))
            self.assertEqual((code, out), (1, ""), args)
            self.assertIn(expected, err)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertNotIn(expired, err)


class ProviderTests(LoginTestCase):
    """Discovery and transport checks of :class:`arc.cli.oidcclient.Provider`."""

    def provider(self, **kw):
        return oidcclient.Provider(self.issuer, **kw)

    @inlineCallbacks
    def test_untrusted_certificate(self):
        d = deferToThread(self.provider().metadata)
        error = yield self.assertFailure(d, oidcclient.OIDCError)
        self.assertIn("not trusted", str(error))
        self.assertIn("--ca-file", str(error))

    @inlineCallbacks
    def test_redirect_not_followed(self):
        self.server.override("discovery", 302, headers={"Location": "https://example.com/"})
        d = deferToThread(self.provider(ca_file=self.ca_file).metadata)
        error = yield self.assertFailure(d, oidcclient.OIDCError)
        self.assertIn("redirects are not followed", str(error))

    @inlineCallbacks
    def test_size_cap(self):
        self.server.override("discovery", 200, {"issuer": self.issuer, "x": "y" * 5000})
        d = deferToThread(self.provider(ca_file=self.ca_file, max_size=1000).metadata)
        error = yield self.assertFailure(d, oidcclient.OIDCError)
        self.assertIn("more than 1000", str(error))

    @inlineCallbacks
    def test_issuer_must_match(self):
        provider = oidcclient.Provider(self.issuer + "/", ca_file=self.ca_file)
        error = yield self.assertFailure(deferToThread(provider.metadata), oidcclient.OIDCError)
        self.assertIn("use exactly that as --issuer", str(error))

    @inlineCallbacks
    def test_default_scopes_follow_discovery(self):
        """Scopes the provider does not list are left out of the default."""
        self.server.extra_metadata["scopes_supported"] = ["openid", "email", "offline_access"]
        scopes = yield deferToThread(self.provider(ca_file=self.ca_file).default_scopes,
                                     tokencache.DEFAULT_SCOPES)
        self.assertEqual(scopes, "openid email offline_access")

    @inlineCallbacks
    def test_connection_refused(self):
        yield self.server.stop()
        d = deferToThread(self.provider(ca_file=self.ca_file, timeout=5).metadata)
        error = yield self.assertFailure(d, oidcclient.OIDCError)
        self.assertIn("cannot connect", str(error))


class OfflineTests(SynchronousTestCase):
    """Pieces that need no network."""

    def test_exec_info(self):
        self.assertEqual(token_cli.exec_info({}), (False, EXEC_V1))
        self.assertEqual(token_cli.exec_info({"KUBERNETES_EXEC_INFO": "not json"}),
                         (False, EXEC_V1))
        info = {"apiVersion": EXEC_V1, "spec": {"interactive": True, "cluster": {"x": 1}}}
        self.assertEqual(token_cli.exec_info({"KUBERNETES_EXEC_INFO": json.dumps(info)}),
                         (True, EXEC_V1))

    def test_display(self):
        self.assertFalse(login_cli.display_available({}, "linux"))
        self.assertTrue(login_cli.display_available({"DISPLAY": ":0"}, "linux"))
        self.assertTrue(login_cli.display_available({"BROWSER": "w3m"}, "linux"))
        self.assertTrue(login_cli.display_available({}, "darwin"))

    def test_config_dir(self):
        base = os.path.abspath(self.mktemp())
        self.assertEqual(tokencache.cache_path("p", {"ARC_CONFIG_DIR": base}),
                         os.path.join(base, "tokens", "p.json"))
        self.assertEqual(tokencache.config_path(None, {"XDG_CONFIG_HOME": base}),
                         os.path.join(base, "arc", "login.yaml"))

    def test_profile_names(self):
        for bad in ("", "../x", ".hidden", "a/b", "x" * 65):
            self.assertRaises(CommandError, tokencache.check_profile, bad)
        self.assertEqual(tokencache.check_profile("prod-eu.1"), "prod-eu.1")

    def test_profiles_file(self):
        """login.yaml keeps profiles side by side; mistakes name the file and key."""
        path = os.path.join(os.path.abspath(self.mktemp()), "login.yaml")
        tokencache.save_profile(tokencache.Profile("a", "https://a.example", "arc"), path)
        tokencache.save_profile(tokencache.Profile("b", "https://b.example", "kube",
                                                   scopes="openid"), path)
        a = tokencache.load_profile("a", path)
        b = tokencache.load_profile("b", path)
        self.assertEqual((a.issuer, a.client_id, a.scopes), ("https://a.example", "arc", None))
        self.assertEqual((b.issuer, b.scopes), ("https://b.example", "openid"))
        self.assertIsNone(tokencache.load_profile("c", path).issuer)
        with open(path, "a") as f:
            f.write("extra: 1\n")
        error = self.assertRaises(ConfigError, tokencache.load_profile, "a", path)
        self.assertIn("extra: unknown key", str(error))

    def test_missing_settings(self):
        args = Namespace(config=os.path.join(os.path.abspath(self.mktemp()), "login.yaml"),
                         profile="dev", issuer=None, client_id="arc", ca_file=None, scopes=None)
        profile, path = login_cli.resolve_profile(args)
        error = self.assertRaises(CommandError, login_cli.require_settings, profile, path)
        self.assertIn('run "arc login --profile dev --issuer URL"', str(error))

    def test_jwt_helpers(self):
        self.assertIsNone(tokencache.jwt_claims("opaque"))
        self.assertIsNone(tokencache.jwt_expiry("a.!!.c"))
        self.assertEqual(tokencache.rfc3339(0), "1970-01-01T00:00:00Z")
        self.assertEqual(tokencache.describe_delay(125), "2 min")

    def test_damaged_cache(self):
        base = os.path.abspath(self.mktemp())
        cache = tokencache.TokenCache("x", {"ARC_CONFIG_DIR": base})
        os.makedirs(cache.directory)
        with open(cache.path, "w") as f:
            f.write("{")
        error = self.assertRaises(CommandError, cache.load)
        self.assertIn('is damaged; run "arc login --profile x"', str(error))

    def test_pkce(self):
        verifier, challenge = oidcclient.pkce_pair()
        self.assertTrue(43 <= len(verifier) <= 128)
        self.assertRegex(verifier, r"^[A-Za-z0-9._~-]+$")
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        self.assertEqual(challenge, base64.urlsafe_b64encode(digest).decode().rstrip("="))
        self.assertNotIn("=", challenge)

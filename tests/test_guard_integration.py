"""The guard through the whole chain: OIDC tokens, impersonation, audit.

Real processes: a local OIDC issuer, the API server emulator (which honours
impersonation only from the guard's own identity), relay, agent with the
guard, client; real kubectl.  The relay authenticates the same OIDC token
at the client tunnel and authorizes by group.
"""

import json
import os
import subprocess
import sys

from twisted.trial import unittest

from arc import demo
from arc.testing.procs import Part, wait_for
from tests.chain import Chain, read_until
from tests.test_integration import ChainMixin

GUARD_TOKEN = "guard-own-token-123"


def start_issuer(base):
    state = os.path.join(base, "oidc")
    part = Part("oidc", [sys.executable, "-m", "arc.testing.oidc", "--state-dir", state],
                os.path.join(base, "oidc.log")).start()
    url_file = os.path.join(state, "url")
    wait_for(lambda: os.path.exists(url_file) and open(url_file).read().strip(), 30,
             "the OIDC issuer to listen", alive=part)
    part.url = open(url_file).read().strip()
    part.ca_file = os.path.join(state, "ca.crt")
    part.state = state
    return part


def mint(issuer, path, sub, groups, ttl=3600):
    token = subprocess.run(
        [sys.executable, "-m", "arc.testing.oidc", "--state-dir", issuer.state, "mint",
         "--sub", sub, "--groups", ",".join(groups), "--aud", "arc", "--ttl", str(ttl)],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    with open(path, "w") as f:
        f.write(token + "\n")
    return token


class OIDCGuardTests(ChainMixin, unittest.TestCase):
    """Impersonation mode with an OIDC issuer, end to end."""

    clock_skew = None

    @classmethod
    def make_chain(cls, base):
        issuer = start_issuer(base)
        cls.alice_file = os.path.join(base, "alice.jwt")
        cls.alice = mint(issuer, cls.alice_file, "alice", ["dev", "ops"])
        cls.mallory_file = os.path.join(base, "mallory.jwt")
        mint(issuer, cls.mallory_file, "mallory", ["dev"])
        oidc = {"issuer": issuer.url, "client_id": "arc", "ca_file": issuer.ca_file,
                "username_prefix": "oidc:", "groups_prefix": "oidc:"}
        if cls.clock_skew is not None:
            oidc["clock_skew"] = cls.clock_skew
        cls.audit_file = os.path.join(base, "audit.jsonl")
        chain = Chain(
            base, api_tokens=["%s=arc-guard" % GUARD_TOKEN, "admin-token=admin:system:masters"],
            api_extra=["--impersonator", "arc-guard", "--deny-user", "oidc:mallory"],
            guard={"identity": {"oidc": [oidc]}, "audit": {"destination": cls.audit_file}},
            relay_identity={"oidc": [oidc]},
            bindings=[{"cluster": "demo", "groups": ["oidc:dev"]}],
            user_token_file=cls.alice_file)
        chain.parts["oidc"] = issuer
        return chain

    def test_whoami_shows_impersonated_identity(self):
        out = self.kubectl("auth", "whoami", "-o", "json").stdout
        info = json.loads(out)["status"]["userInfo"]
        self.assertEqual(info["username"], "oidc:alice")
        self.assertIn("oidc:dev", info["groups"])
        self.assertIn("oidc:ops", info["groups"])
        issuer = self.chain.parts["oidc"].url
        self.assertEqual(info["extra"]["arc.dev/issuer"], [issuer])
        self.assertEqual(info["extra"]["arc.dev/subject"], ["alice"])

    def test_backend_sees_exactly_the_guard_headers(self):
        self.kubectl("get", "pods")
        request = [r for r in self.chain.requests()
                   if r["path"] == "/api/v1/namespaces/default/pods"][-1]
        headers = request["headers"]
        names = [name.lower() for name, _ in headers]
        self.assertEqual([v for n, v in headers if n.lower() == "authorization"],
                         ["Bearer " + GUARD_TOKEN])
        self.assertEqual([v for n, v in headers if n.lower() == "impersonate-user"],
                         ["oidc:alice"])
        self.assertEqual(sorted(v for n, v in headers if n.lower() == "impersonate-group"),
                         ["oidc:dev", "oidc:ops"])
        self.assertEqual(names.count("audit-id"), 1)
        for forbidden in ("x-remote-user", "x-forwarded-for"):
            self.assertNotIn(forbidden, names)
        self.assertNotIn(self.alice, json.dumps(request))
        self.assertEqual(request["user"]["username"], "arc-guard")
        self.assertEqual(request["effective"]["username"], "oidc:alice")

    def test_rbac_denial_comes_from_the_api_server(self):
        kubeconfig = self.chain.files.kubeconfig
        mallory = os.path.join(self.base, "mallory.kubeconfig")
        with open(kubeconfig) as f:
            text = f.read()
        with open(mallory, "w") as f:
            f.write(text.replace(self.alice_file, self.mallory_file))
        result = self.kubectl("get", "pods", kubeconfig=mallory, check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Forbidden", result.stderr)
        self.assertIn("oidc:mallory", result.stderr)

    def test_client_impersonation_refused(self):
        result = self.kubectl("get", "pods", "--as=root", check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("impersonation", result.stderr)
        self.assertIn("not allowed", result.stderr)

    def test_exec_and_logs_follow(self):
        out = self.kubectl("exec", "ticker", "--", "whoami").stdout
        self.assertEqual(out.strip(), "oidc:alice")
        logs = self.chain.kubectl_background("logs", "-f", "ticker")
        try:
            read_until(logs, lambda text: text.count("\n") >= 3, 30)
        finally:
            logs.kill()
            logs.wait(10)

    def test_audit_record_per_request(self):
        self.kubectl("get", "configmaps")
        wait_for(lambda: os.path.exists(self.audit_file) and "configmaps" in open(
            self.audit_file).read(), 10, "the audit record")
        with open(self.audit_file) as f:
            text = f.read()
        records = [json.loads(line) for line in text.splitlines()]
        record = [r for r in records if r.get("resource") == "configmaps"][-1]
        self.assertEqual(record["user"], "oidc:alice")
        self.assertEqual(record["verb"], "list")
        self.assertEqual(record["decision"], "allow")
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["method"], "oidc")
        self.assertGreater(record["bytes_out"], 0)
        self.assertNotIn(self.alice, text)
        for part in self.chain.parts.values():
            self.assertNotIn(self.alice, part.output())

    def test_relay_refuses_a_token_from_another_issuer(self):
        other = os.path.join(self.base, "other.token")
        with open(other, "w") as f:
            f.write("not-a-jwt-and-not-static\n")
        config = self.chain.variant(self.chain.files.client_config, "client-other.yaml",
                                    lambda c: c["relay"].update(token_file=other) or c.update(
                                        kubeconfig=os.path.join(self.base, "other.kubeconfig"),
                                        listen="tcp:0:interface=127.0.0.1",
                                        state_dir=os.path.join(self.base, "other-state")))
        part = self.chain.start_client(config, name="client-other")
        self.addCleanup(part.stop)
        wait_for(lambda: "user token rejected" in part.output(), 20,
                 "the relay to refuse the token")



class StaticGuardDemoTests(ChainMixin, unittest.TestCase):
    """The demo's mode: a static token for the demo user, impersonated by the guard."""

    @classmethod
    def make_chain(cls, base):
        return Chain(base, api_tokens=["%s=%s" % (demo.GUARD_TOKEN, demo.GUARD_USER),
                                       "%s=admin:system:masters" % demo.API_TOKEN],
                     api_extra=["--impersonator", demo.GUARD_USER], guard="static")

    def test_whoami_is_the_demo_user(self):
        out = self.kubectl("auth", "whoami", "-o", "json").stdout
        info = json.loads(out)["status"]["userInfo"]
        self.assertEqual(info["username"], demo.USER)
        self.assertIn("demo-team", info["groups"])

    def test_as_is_refused_with_a_clear_403(self):
        result = self.kubectl("auth", "whoami", "--as=someone-else", check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("impersonation", result.stderr)



class TokenExpiryTests(ChainMixin, unittest.TestCase):
    """A token that expires during ``logs -f`` does not cut it; new requests need a new one."""

    clock_skew = 0
    make_chain = OIDCGuardTests.__dict__["make_chain"]

    def test_logs_follow_outlives_its_token(self):
        import time
        issuer = self.chain.parts["oidc"]
        short = os.path.join(self.base, "short.jwt")
        mint(issuer, short, "alice", ["dev"], ttl=4)
        kubeconfig = os.path.join(self.base, "short.kubeconfig")
        with open(self.chain.files.kubeconfig) as f:
            text = f.read()
        with open(kubeconfig, "w") as f:
            f.write(text.replace(self.alice_file, short))
        argv = [self.chain.kubectl_bin, "--kubeconfig", kubeconfig, "--cache-dir",
                self.chain.cache, "logs", "-f", "ticker"]
        logs = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            read_until(logs, lambda text: text.count("\n") >= 2, 30)
            time.sleep(6)   # the token (4 s) is now expired; clock_skew is 0 here
            expired = self.kubectl("get", "pods", kubeconfig=kubeconfig, check=False)
            self.assertNotEqual(expired.returncode, 0)
            self.assertIn("expired", expired.stderr)
            later = read_until(logs, lambda text: text.count("\n") >= 5, 30)
            self.assertTrue(later)
            self.assertIsNone(logs.poll(), "logs -f was cut")
        finally:
            logs.kill()
            logs.wait(10)

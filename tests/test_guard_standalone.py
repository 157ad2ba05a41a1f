"""``twistd arc-guard`` alone: real processes, real kubectl.

The API server emulator trusts the guard's own token as ``arc-guard``, an
impersonator, and answers SubjectAccessReviews from ``--allow-impersonate``
rules.  The guard serves TLS on 127.0.0.1 with a certificate from a CA made
here; kubectl presents a static token the guard knows as ``alice``.
"""

import json
import os
import signal
import subprocess

import yaml
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial import unittest

from arc import pki
from arc.guard.tap import describe_peer
from arc.relay.registry import token_digest
from arc.testing.procs import Part, free_port, port_in_use, start_apiserver, twist, wait_for
from tests.chain import kubectl_binary
from tests.test_integration import ChainMixin

GUARD_TOKEN = "standalone-guard-token-5d1c"
ALICE_TOKEN = "alice-static-token-8f2e41"


class StandaloneGuard:
    """Emulator + guard in ``base``; the object ChainMixin starts and stops."""

    def __init__(self, base):
        self.base = base
        self.parts = {}
        self.kubectl_bin = kubectl_binary()
        self.cache = os.path.join(base, "kube-cache")
        self.audit_file = os.path.join(base, "audit.jsonl")
        self.request_log = os.path.join(base, "api-requests.jsonl")

    def start(self):
        self.parts["api"] = start_apiserver(
            self.base, tokens=["%s=arc-guard" % GUARD_TOKEN, "admin-token=admin:system:masters"],
            extra=["--impersonator", "arc-guard", "--request-log", self.request_log,
                   "--allow-impersonate", "alice=bob", "--allow-impersonate", "alice=viewers"])
        ca, ca_key = pki.new_ca("arc test guard CA")
        cert, key = pki.issue(ca, ca_key, "guard", ips=["127.0.0.1"])
        files = {}
        for name, data in (("ca.crt", ca), ("guard.crt", cert), ("guard.key", key)):
            files[name] = os.path.join(self.base, name)
            pki.write_private(files[name], data)
        self.port = free_port()
        config = {
            "cluster": "standalone",
            "listen": "tcp:%d:interface=127.0.0.1" % self.port,
            "tls": {"cert_file": files["guard.crt"], "key_file": files["guard.key"]},
            "upstream": {"kubeconfig": self.parts["api"].kubeconfig},
            "guard": {
                "identity": {"static": {"alice": {"token_sha256": token_digest(ALICE_TOKEN),
                                                  "groups": ["dev"]}}},
                "allow_impersonation": True,
                "audit": {"destination": self.audit_file},
            },
        }
        self.config = os.path.join(self.base, "guard.yaml")
        with open(self.config, "w") as f:
            yaml.safe_dump(config, f)
        part = self.parts["guard"] = Part("guard", twist("arc-guard", self.config),
                                          os.path.join(self.base, "guard.log")).start()
        wait_for(lambda: port_in_use(self.port), 30, "the guard to listen", alive=part)
        self.kubeconfig = self.write_kubeconfig("kubeconfig", ALICE_TOKEN, files["ca.crt"])
        wait_for(lambda: self.kubectl("get", "--raw", "/version", check=False).returncode == 0,
                 30, "kubectl to answer through the guard", alive=part)
        return self

    def write_kubeconfig(self, name, token, ca_file):
        path = os.path.join(self.base, name)
        with open(path, "w") as f:
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "guard",
                "clusters": [{"name": "guard", "cluster": {
                    "server": "https://127.0.0.1:%d" % self.port,
                    "certificate-authority": ca_file}}],
                "users": [{"name": "alice", "user": {"token": token}}],
                "contexts": [{"name": "guard", "context": {"cluster": "guard", "user": "alice",
                                                           "namespace": "default"}}],
            }, f)
        return path

    def stop(self):
        for part in reversed(list(self.parts.values())):
            part.stop()

    def kubectl(self, *args, kubeconfig=None, check=True, timeout=60, stdin=""):
        argv = [self.kubectl_bin, "--kubeconfig", kubeconfig or self.kubeconfig,
                "--cache-dir", self.cache] + list(args)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                input=stdin)
        if check and result.returncode != 0:
            raise AssertionError("kubectl %s failed (%d): %s%s" % (
                " ".join(args), result.returncode, result.stdout, result.stderr))
        return result

    def audit(self, predicate, what):
        """The last audit record matching ``predicate`` (waits for it, bounded)."""
        def find():
            if not os.path.exists(self.audit_file):
                return None
            with open(self.audit_file) as f:
                records = [json.loads(line) for line in f if line.strip()]
            found = [r for r in records if predicate(r)]
            return found[-1] if found else None
        return wait_for(find, 10, what)

    def requests(self):
        with open(self.request_log) as f:
            return [json.loads(line) for line in f if line.strip()]


class StandaloneGuardTests(ChainMixin, unittest.TestCase):
    @classmethod
    def make_chain(cls, base):
        return StandaloneGuard(base)

    def whoami(self, *extra):
        out = self.kubectl("auth", "whoami", "-o", "json", *extra).stdout
        return json.loads(out)["status"]["userInfo"]

    def test_whoami_is_the_impersonated_caller(self):
        info = self.whoami()
        self.assertEqual(info["username"], "alice")
        self.assertIn("dev", info["groups"])

    def test_get_pods(self):
        out = self.kubectl("get", "pods").stdout
        self.assertIn("ticker", out)
        request = [r for r in self.chain.requests()
                   if r["path"] == "/api/v1/namespaces/default/pods"][-1]
        self.assertEqual(request["user"]["username"], "arc-guard")
        self.assertEqual(request["effective"]["username"], "alice")
        self.assertNotIn(ALICE_TOKEN, json.dumps(request))

    def test_exec(self):
        result = self.kubectl("exec", "-i", "ticker", "--", "cat", stdin="through the guard\n")
        self.assertEqual(result.stdout, "through the guard\n")
        out = self.kubectl("exec", "ticker", "--", "whoami").stdout
        self.assertEqual(out.strip(), "alice")
        record = self.chain.audit(lambda r: r.get("subresource") == "exec", "the exec record")
        self.assertEqual((record["status"], record["upgrade"]), (101, "websocket"))

    def test_audit_names_the_peer_and_holds_no_token(self):
        self.kubectl("get", "configmaps")
        record = self.chain.audit(lambda r: r.get("resource") == "configmaps",
                                  "the configmaps record")
        self.assertEqual((record["cluster"], record["user"], record["decision"]),
                         ("standalone", "alice", "allow"))
        self.assertTrue(record["peer"].startswith("127.0.0.1:"), record["peer"])
        with open(self.chain.audit_file) as f:
            self.assertNotIn(ALICE_TOKEN, f.read())
        for part in self.chain.parts.values():
            self.assertNotIn(ALICE_TOKEN, part.output())

    def test_sighup_reopens_the_audit_file(self):
        rotated = self.chain.audit_file + ".1"
        self.kubectl("get", "pods")
        self.chain.audit(lambda r: r.get("resource") == "pods", "a record before rotation")
        os.rename(self.chain.audit_file, rotated)
        self.addCleanup(lambda: os.path.exists(rotated) and os.unlink(rotated))
        os.kill(self.chain.parts["guard"].pid, signal.SIGHUP)
        wait_for(lambda: "reopening the audit log" in self.chain.parts["guard"].output(), 10,
                 "the guard to reopen its audit log")
        self.kubectl("get", "configmap", "after-rotation", check=False)
        record = self.chain.audit(lambda r: r.get("name") == "after-rotation",
                                  "a record in the new file")
        self.assertEqual(record["decision"], "allow")
        with open(rotated) as f:
            self.assertNotIn("after-rotation", f.read())
        self.assertTrue(self.chain.parts["guard"].running())

    def test_unknown_token_refused(self):
        ca_file = os.path.join(self.chain.base, "ca.crt")
        other = self.chain.write_kubeconfig("other.kubeconfig", "not-a-known-token", ca_file)
        result = self.kubectl("get", "pods", kubeconfig=other, check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("refused the token", result.stderr)

    # -- kubectl --as, checked by SubjectAccessReview --------------------------------

    def test_as_allowed_user(self):
        info = self.whoami("--as=bob")
        self.assertEqual(info["username"], "bob")
        self.assertNotIn("dev", info["groups"])
        record = self.chain.audit(lambda r: r.get("impersonated_user") == "bob"
                                  and r.get("status") == 201, "the --as=bob record")
        self.assertEqual((record["user"], record["groups"]), ("alice", ["dev"]))
        requests = self.chain.requests()
        reviews = [r for r in requests
                   if r["path"] == "/apis/authorization.k8s.io/v1/subjectaccessreviews"]
        self.assertTrue(reviews, "the guard asked the API server")
        self.assertEqual({r["user"]["username"] for r in reviews}, {"arc-guard"})
        whoami = [r for r in requests if r["path"].endswith("/selfsubjectreviews")][-1]
        self.assertEqual((whoami["user"]["username"], whoami["effective"]["username"]),
                         ("arc-guard", "bob"))

    def test_as_allowed_user_and_group(self):
        info = self.whoami("--as=bob", "--as-group=viewers")
        self.assertEqual(info["username"], "bob")
        self.assertIn("viewers", info["groups"])

    def test_as_denied_user(self):
        result = self.kubectl("get", "pods", "--as=carol", check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("'alice' may not impersonate user 'carol'", result.stderr)
        record = self.chain.audit(lambda r: r.get("impersonated_user") == "carol",
                                  "the denied record")
        self.assertEqual((record["decision"], record["status"]), ("deny", 403))

    def test_as_denied_group(self):
        result = self.kubectl("get", "pods", "--as=bob", "--as-group=admins", check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("group 'admins'", result.stderr)
        self.assertNotIn("user 'bob'", result.stderr)


class PeerTests(unittest.TestCase):
    def test_describe_peer(self):
        self.assertEqual(describe_peer(IPv4Address("TCP", "127.0.0.1", 5)), "127.0.0.1:5")
        self.assertEqual(describe_peer(IPv6Address("TCP", "::1", 5)), "[::1]:5")
        self.assertEqual(describe_peer(UNIXAddress(b"/run/guard.sock")), "/run/guard.sock")
        self.assertEqual(describe_peer(UNIXAddress(None)), "unix")


class StartupTests(unittest.TestCase):
    def test_missing_tls_stops_start_up(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "guard.yaml")
        with open(path, "w") as f:
            f.write("cluster: demo\nlisten: tcp:0:interface=127.0.0.1\n")
        result = subprocess.run(twist("arc-guard", path), capture_output=True, text=True,
                                timeout=60, cwd=base, stdin=subprocess.DEVNULL)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("%s: tls: required section is missing" % path,
                      result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

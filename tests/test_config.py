"""Configuration files: every mistake stops start-up naming file, key and reason."""

import os
import subprocess
import sys

import yaml

from twisted.python import usage
from twisted.trial import unittest

from arc.agent.config import load_agent_config
from arc.client.config import load_client_config
from arc.errors import ConfigError
from arc.guard.tap import Options as GuardOptions
from arc.guard.tap import load_guard_config
from arc.relay.config import load_relay_config
from arc.relay.registry import token_digest
from arc.relay.tap import Options as RelayOptions

DIGEST = token_digest("agent-token")


class ConfigTestCase(unittest.TestCase):
    def write(self, name, text):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        path = os.path.join(path, name)
        with open(path, "w") as f:
            f.write(text)
        for extra in ("relay.crt", "relay.key", "ca.crt", "token"):
            with open(os.path.join(os.path.dirname(path), extra), "w") as f:
                f.write("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
                        if extra.endswith(".crt") else "secret-token\n")
        return path

    def assertConfigError(self, loader, path, key, reason):
        with self.assertRaises(ConfigError) as caught:
            loader(path)
        error = caught.exception
        self.assertEqual(error.file, path)
        self.assertEqual(error.key, key)
        self.assertIn(reason, error.reason)
        self.assertTrue(str(error).startswith("%s: %s: " % (path, key)))
        return error


RELAY = """\
listen: tcp:0:interface=127.0.0.1
tls: {cert_file: relay.crt, key_file: relay.key}
clusters:
  demo: {agent_token_sha256: %s}
users:
  alice: {token_sha256: %s, groups: [dev]}
bindings:
  - {cluster: demo, groups: [dev]}
""" % (DIGEST, token_digest("alice-token"))


class RelayConfigTests(ConfigTestCase):
    def test_valid(self):
        cfg = load_relay_config(self.write("relay.yaml", RELAY))
        self.assertTrue(cfg.registry.agent_ok("demo", "agent-token"))
        self.assertFalse(cfg.registry.agent_ok("demo", "other"))
        alice = cfg.registry.user("alice-token")
        self.assertEqual(alice.name, "alice")
        self.assertTrue(cfg.registry.allowed(alice, "demo"))

    def test_misspelt_key(self):
        path = self.write("relay.yaml", RELAY + "lisen: tcp:1\n")
        self.assertConfigError(load_relay_config, path, "lisen", "unknown key")

    def test_nested_unknown_key(self):
        path = self.write("relay.yaml", RELAY.replace("key_file: relay.key",
                                                      "key_file: relay.key, ca: x"))
        self.assertConfigError(load_relay_config, path, "tls.ca", "unknown key")

    def test_tls_required(self):
        path = self.write("relay.yaml", RELAY.replace(
            "tls: {cert_file: relay.crt, key_file: relay.key}\n", ""))
        self.assertConfigError(load_relay_config, path, "tls", "give tls.cert_file")

    def test_missing_certificate_file(self):
        path = self.write("relay.yaml", RELAY.replace("relay.crt", "missing.crt"))
        self.assertConfigError(load_relay_config, path, "tls.cert_file", "does not exist")

    def test_bad_digest(self):
        path = self.write("relay.yaml", RELAY.replace(DIGEST, "plain-token"))
        self.assertConfigError(load_relay_config, path, "clusters.demo.agent_token_sha256",
                               "hex SHA-256")

    def test_binding_to_unknown_cluster(self):
        path = self.write("relay.yaml", RELAY.replace("{cluster: demo,", "{cluster: dmeo,"))
        self.assertConfigError(load_relay_config, path, "bindings[0].cluster", "not listed")

    def test_cluster_name_must_be_dns_label(self):
        path = self.write("relay.yaml", RELAY.replace("  demo:", "  Demo_1:").replace(
            "{cluster: demo,", "{cluster: Demo_1,"))
        self.assertConfigError(load_relay_config, path, "clusters.Demo_1", "DNS label")

    def test_wrong_type(self):
        path = self.write("relay.yaml", RELAY + "head_timeout: soon\n")
        self.assertConfigError(load_relay_config, path, "head_timeout", "must be a number")

    def test_keepalive_bounds(self):
        path = self.write("relay.yaml", RELAY + "tunnel: {ping_interval: 30, dead_after: 20}\n")
        self.assertConfigError(load_relay_config, path, "tunnel.dead_after",
                               "longer than ping_interval")

    def test_not_yaml(self):
        path = self.write("relay.yaml", "listen: [unclosed\n")
        with self.assertRaises(ConfigError) as caught:
            load_relay_config(path)
        self.assertIn("not valid YAML", str(caught.exception))

    def test_missing_file(self):
        with self.assertRaises(ConfigError) as caught:
            load_relay_config("/nonexistent/relay.yaml")
        self.assertIn("/nonexistent/relay.yaml", str(caught.exception))

    def test_options_turn_errors_into_usage_errors(self):
        path = self.write("relay.yaml", RELAY + "lisen: tcp:1\n")
        options = RelayOptions()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--config", path])
        self.assertIn("%s: lisen: unknown key" % path, str(caught.exception))

    def test_twistd_stops_with_the_reason(self):
        """Start-up as a user runs it: one line naming file, key and reason; exit 1."""
        path = self.write("relay.yaml", RELAY + "lisen: tcp:1\n")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run([twistd, "-n", "arc-relay", "--config", path],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertIn("%s: lisen: unknown key" % path, result.stdout + result.stderr)


AGENT = """\
cluster: demo
relay:
  url: https://relay.example.com:443
  ca_file: ca.crt
  token_file: token
"""


class AgentConfigTests(ConfigTestCase):
    def test_valid(self):
        cfg = load_agent_config(self.write("agent.yaml", AGENT))
        self.assertEqual(cfg.cluster, "demo")
        self.assertEqual(cfg.relay.credential(), "secret-token")
        self.assertEqual(cfg.relay.server_name, "relay.example.com")

    def test_inline_token_refused(self):
        path = self.write("agent.yaml", AGENT.replace("token_file: token", "token: abc"))
        self.assertConfigError(load_agent_config, path, "relay.token", "not accepted inline")

    def test_token_env(self):
        path = self.write("agent.yaml", AGENT.replace("token_file: token",
                                                      "token_env: ARC_TEST_UNSET_VARIABLE"))
        self.assertConfigError(load_agent_config, path, "relay.token_env", "is not set")

    def test_bad_url(self):
        path = self.write("agent.yaml", AGENT.replace("https://relay.example.com:443",
                                                      "relay.example.com"))
        self.assertConfigError(load_agent_config, path, "relay.url", "https://")

    def test_transport_choice(self):
        path = self.write("agent.yaml", AGENT + "  transport: carrier-pigeon\n")
        self.assertConfigError(load_agent_config, path, "relay.transport", "one of")

    def test_missing_cluster(self):
        path = self.write("agent.yaml", AGENT.replace("cluster: demo\n", ""))
        self.assertConfigError(load_agent_config, path, "cluster", "required")


GUARD = """\
cluster: demo
listen: tcp:0:interface=127.0.0.1
tls: {cert_file: relay.crt, key_file: relay.key}
upstream: {kubeconfig: kubeconfig}
guard:
  identity:
    static:
      ci: {token_sha256: %s, groups: [ci]}
""" % (token_digest("ci-token"),)

KUBECONFIG_WITHOUT_CREDENTIALS = """\
apiVersion: v1
kind: Config
clusters:
  - name: c
    cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}
users:
  - name: nobody
    user: {}
contexts:
  - name: c
    context: {cluster: c, user: nobody}
current-context: c
"""


class GuardConfigTests(ConfigTestCase):
    def guard_file(self, text=GUARD):
        path = self.write("guard.yaml", text)
        with open(os.path.join(os.path.dirname(path), "kubeconfig"), "w") as f:
            f.write(KUBECONFIG_WITHOUT_CREDENTIALS)
        return path

    def test_valid(self):
        cfg = load_guard_config(self.guard_file())
        self.assertEqual((cfg.cluster, cfg.listen), ("demo", "tcp:0:interface=127.0.0.1"))
        self.assertTrue(cfg.guard.impersonates)
        self.assertFalse(cfg.guard.allow_impersonation)
        self.assertTrue(cfg.kubeconfig.endswith("/kubeconfig"))

    def test_tls_required(self):
        path = self.guard_file(GUARD.replace(
            "tls: {cert_file: relay.crt, key_file: relay.key}\n", ""))
        self.assertConfigError(load_guard_config, path, "tls", "required section")

    def test_tls_key_file_required(self):
        path = self.guard_file(GUARD.replace(", key_file: relay.key", ""))
        self.assertConfigError(load_guard_config, path, "tls.key_file", "required")

    def test_ssl_endpoint_refused(self):
        path = self.guard_file(GUARD.replace("tcp:0:interface", "ssl:0:interface"))
        self.assertConfigError(load_guard_config, path, "listen", "TLS comes from the tls:")

    def test_cannot_be_disabled(self):
        path = self.guard_file(GUARD + "  enabled: false\n")
        self.assertConfigError(load_guard_config, path, "guard.enabled", "cannot be disabled")

    def test_guard_keys_checked_like_the_agents(self):
        path = self.guard_file(GUARD + "  allow_impersonaton: true\n")
        self.assertConfigError(load_guard_config, path, "guard.allow_impersonaton",
                               "unknown key")

    def test_impersonation_needs_own_credentials(self):
        path = self.guard_file()
        with self.assertRaises(usage.UsageError) as caught:
            GuardOptions().parseOptions(["--config", path])
        self.assertIn("%s: guard.identity: the guard impersonates callers" % path,
                      str(caught.exception))

    def test_passthrough_needs_no_credentials(self):
        path = self.guard_file(GUARD.split("guard:")[0])
        options = GuardOptions()
        options.parseOptions(["--config", path])
        cfg, target = options["parsed"]
        self.assertFalse(cfg.guard.impersonates)
        self.assertEqual(target.server, "https://127.0.0.1:6443")


CLIENT = """\
relay:
  url: https://relay.example.com
  token_file: token
clusters:
  - name: demo
"""


class ClientConfigTests(ConfigTestCase):
    def test_valid_defaults(self):
        cfg = load_client_config(self.write("client.yaml", CLIENT))
        self.assertEqual(cfg.listen, "tcp:47011:interface=127.0.0.1")
        self.assertEqual([c.context for c in cfg.clusters], ["demo"])

    def test_no_clusters(self):
        path = self.write("client.yaml", CLIENT.replace("  - name: demo\n", "  []\n").replace(
            "clusters:\n  []", "clusters: []"))
        self.assertConfigError(load_client_config, path, "clusters", "at least one cluster")

    def test_duplicate_cluster(self):
        path = self.write("client.yaml", CLIENT + "  - name: demo\n")
        self.assertConfigError(load_client_config, path, "clusters[1].name", "listed twice")


class ExampleTests(ConfigTestCase):
    """The commented examples in etc/ load with the real loaders."""

    def example(self, name):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "etc", name)) as f:
            text = f.read()
        return self.write(name, text.replace("relay-ca.crt", "ca.crt").replace(
            "/var/run/secrets/arc/agent-token", "token").replace(
            "~/.config/arc/relay-token", "token").replace(
            "~/.config/arc/prod-eu.token", "token"))

    def test_relay_example(self):
        cfg = load_relay_config(self.example("relay.yaml"))
        self.assertEqual(sorted(cfg.registry.clusters), ["prod-eu", "staging"])

    def test_agent_example(self):
        cfg = load_agent_config(self.example("agent.yaml"))
        self.assertEqual(cfg.cluster, "prod-eu")

    def test_agent_example_guard_section(self):
        """The commented guard: section of etc/agent.yaml is valid once uncommented."""
        path = self.example("agent.yaml")
        with open(path) as f:
            text = f.read()
        block = text[text.index("\n# guard:\n") + 1:]
        self.assertTrue(all(line.startswith("#") for line in block.splitlines()))
        with open(path, "w") as f:
            f.write(text + "\n".join(line[2:] for line in block.splitlines()) + "\n")
        cfg = load_agent_config(path)
        self.assertTrue(cfg.guard.impersonates)
        self.assertEqual(sorted(cfg.guard.authenticator.issuers),
                         ["https://login.example.com/tenant/v2.0"])
        self.assertFalse(cfg.guard.allow_impersonation)

    def test_guard_example(self):
        path = self.example("guard.yaml")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("guard.crt", "relay.crt").replace("guard.key", "relay.key"))
        cfg = load_guard_config(path)
        self.assertEqual(cfg.cluster, "prod-eu")
        self.assertTrue(cfg.guard.impersonates)
        self.assertEqual(len(cfg.guard.authenticator.static), 1)
        self.assertFalse(cfg.guard.authenticator.passthrough)

    def test_client_example(self):
        cfg = load_client_config(self.example("client.yaml"))
        self.assertEqual([c.name for c in cfg.clusters], ["prod-eu", "staging"])
        self.assertEqual(cfg.clusters[1].listen, "tcp:47012:interface=127.0.0.1")


class RBACExampleTests(unittest.TestCase):
    """etc/rbac/guard.yaml: the guard's account may impersonate, and nothing else."""

    def setUp(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "etc", "rbac", "guard.yaml")) as f:
            self.text = f.read()
        self.by_kind = self.objects(self.text)

    @staticmethod
    def objects(text):
        by_kind = {}
        for o in yaml.safe_load_all(text):
            if o:
                by_kind.setdefault(o["kind"], []).append(o)
        return by_kind

    def uncommented(self):
        """The file with its commented review objects (after ``# ---``) uncommented."""
        start = self.text.index("\n# ---\n") + 1
        block = self.text[start:].splitlines()
        self.assertTrue(all(line.startswith("# ") for line in block))
        return self.objects(self.text[:start] + "\n".join(line[2:] for line in block))

    def test_service_account(self):
        [account] = self.by_kind["ServiceAccount"]
        self.assertEqual(account["metadata"], {"name": "arc-guard", "namespace": "arc-system"})

    def test_impersonation_role_grants_only_impersonate(self):
        role = [r for r in self.by_kind["ClusterRole"] if r["metadata"]["name"] == "arc-guard"][0]
        granted = set()
        for rule in role["rules"]:
            self.assertEqual(rule["verbs"], ["impersonate"])
            self.assertNotIn("resourceNames", rule)
            for group in rule["apiGroups"]:
                granted.update((group, resource) for resource in rule["resources"])
        self.assertEqual(granted, {("", "users"), ("", "groups"), ("", "serviceaccounts"),
                                   ("authentication.k8s.io", "uids"),
                                   ("authentication.k8s.io", "userextras/*")})

    def test_review_role_is_commented_out_and_only_creates_reviews(self):
        self.assertEqual([r["metadata"]["name"] for r in self.by_kind["ClusterRole"]],
                         ["arc-guard"])
        roles = [r for r in self.uncommented()["ClusterRole"]
                 if r["metadata"]["name"] != "arc-guard"]
        self.assertEqual(len(roles), 1)
        self.assertEqual(roles[0]["rules"], [{"apiGroups": ["authorization.k8s.io"],
                                              "resources": ["subjectaccessreviews"],
                                              "verbs": ["create"]}])

    def test_bindings_name_the_service_account(self):
        by_kind = self.uncommented()
        roles = {r["metadata"]["name"] for r in by_kind["ClusterRole"]}
        bindings = by_kind["ClusterRoleBinding"]
        self.assertEqual({b["roleRef"]["name"] for b in bindings}, roles)
        self.assertEqual(len(bindings), 2)
        for binding in bindings:
            self.assertEqual(binding["roleRef"]["kind"], "ClusterRole")
            self.assertEqual(binding["subjects"], [{"kind": "ServiceAccount", "name": "arc-guard",
                                                    "namespace": "arc-system"}])

"""Deployment artefacts, checked offline.

``arc agent manifest`` output and the relay's kustomization are validated
against the Kubernetes API schemas shipped by ``kubernetes-validate`` (no
cluster, no network), and checked for least privilege and hardening; the
agent.yaml they carry loads with the agent's own loader; the probe script
runs against real sockets; the Dockerfile and the systemd unit are parsed
for what makes them safe.
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import yaml
from twisted.trial import unittest

from arc import pki
from arc.agent.config import load_agent_config
from arc.cli import agent
from arc.cli.main import CommandError
from arc.relay.config import load_relay_config

try:
    import kubernetes_validate
except ImportError:
    kubernetes_validate = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S_VERSION = "1.30"
RELAY = "https://relay.example.com:8443"
ISSUER = "https://login.example.com/tenant/v2.0"


def by_kind(objects):
    out = {}
    for obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out


class SchemaMixin:
    def validate(self, objects):
        """Every object against the Kubernetes OpenAPI schema, unknown fields refused."""
        if kubernetes_validate is None:
            raise unittest.SkipTest("kubernetes-validate is not installed (pip install "
                                    "kubernetes-validate): schema checks skipped")
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                self.fail("%s/%s does not match the Kubernetes %s schema: %s at %s" % (
                    obj["kind"], obj["metadata"]["name"], K8S_VERSION, e.message,
                    ".".join(map(str, e.path))))

    def assertHardenedPod(self, pod):
        security = pod["securityContext"]
        self.assertTrue(security["runAsNonRoot"])
        self.assertEqual(security["runAsUser"], dockerfile_uid())
        self.assertEqual(security["seccompProfile"], {"type": "RuntimeDefault"})
        for container in pod["containers"]:
            context = container["securityContext"]
            self.assertIs(context["readOnlyRootFilesystem"], True)
            self.assertIs(context["allowPrivilegeEscalation"], False)
            self.assertEqual(context["capabilities"], {"drop": ["ALL"]})
            for kind in ("requests", "limits"):
                self.assertEqual(sorted(container["resources"][kind]), ["cpu", "memory"])
            self.assertIn("readinessProbe", container)
            self.assertIn("livenessProbe", container)
            self.assertNotIn("tcpSocket", container["readinessProbe"])
            self.assertNotIn("tcpSocket", container["livenessProbe"])


def dockerfile_uid():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        users = re.findall(r"^USER\s+(\S+)", f.read(), re.M)
    return int(users[-1].split(":")[0])


# -- arc agent manifest -----------------------------------------------------------------


class AgentManifestTests(SchemaMixin, unittest.TestCase):
    def setUp(self):
        self.ca_pem = pki.new_ca("relay CA")[0].decode()

    def render(self, **kwargs):
        kwargs.setdefault("ca_pem", self.ca_pem)
        self.text = agent.manifest("prod-eu", RELAY, **kwargs)
        self.objects = [o for o in yaml.safe_load_all(self.text) if o]
        return by_kind(self.objects)

    def test_oidc_objects_match_the_schemas(self):
        kinds = self.render(guard="oidc", oidc_issuer=ISSUER, oidc_client_id="arc",
                            allow_impersonation=True)
        self.assertEqual(sorted(kinds), ["ClusterRole", "ClusterRoleBinding", "ConfigMap",
                                         "Deployment", "Namespace", "NetworkPolicy",
                                         "ServiceAccount"])
        self.validate(self.objects)

    def test_passthrough_objects_match_the_schemas(self):
        kinds = self.render()
        self.assertEqual(sorted(kinds), ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy",
                                         "ServiceAccount"])
        self.validate(self.objects)

    def test_impersonation_is_the_only_permission(self):
        kinds = self.render(guard="oidc", oidc_issuer=ISSUER, oidc_client_id="arc")
        [role] = kinds["ClusterRole"]
        granted = set()
        for rule in role["rules"]:
            self.assertEqual(rule["verbs"], ["impersonate"])
            self.assertNotIn("resourceNames", rule)
            granted.update((group, r) for group in rule["apiGroups"] for r in rule["resources"])
        self.assertEqual(granted, {("", "users"), ("", "groups"), ("", "serviceaccounts"),
                                   ("authentication.k8s.io", "uids"),
                                   ("authentication.k8s.io", "userextras/*")})
        [binding] = kinds["ClusterRoleBinding"]
        self.assertEqual(binding["roleRef"]["name"], role["metadata"]["name"])
        self.assertEqual(binding["subjects"], [{"kind": "ServiceAccount", "name": "arc-agent",
                                                "namespace": "arc-system"}])

    def test_allow_impersonation_adds_only_subject_access_reviews(self):
        kinds = self.render(guard="oidc", oidc_issuer=ISSUER, oidc_client_id="arc",
                            allow_impersonation=True)
        review = [r for r in kinds["ClusterRole"] if r["metadata"]["name"].endswith("review")]
        self.assertEqual(review[0]["rules"], [{"apiGroups": ["authorization.k8s.io"],
                                               "resources": ["subjectaccessreviews"],
                                               "verbs": ["create"]}])
        self.assertEqual(len(kinds["ClusterRoleBinding"]), 2)

    def test_no_secret_and_no_token(self):
        self.render()
        self.assertNotIn("kind: Secret", self.text)
        header = self.text.split("---", 1)[0]
        self.assertRegex(header, r"(?m)^#\s+kubectl -n arc-system create secret generic "
                                 r"arc-agent-token --from-file=token=")
        self.assertTrue(all(line.startswith("#") for line in header.strip().splitlines()))

    def test_deployment_is_hardened_and_mounts_the_token_secret(self):
        [deployment] = self.render()["Deployment"]
        pod = deployment["spec"]["template"]["spec"]
        self.assertHardenedPod(pod)
        self.assertEqual(pod["serviceAccountName"], "arc-agent")
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.assertEqual(volumes["agent-token"]["secret"]["secretName"], "arc-agent-token")
        self.assertEqual(pod["containers"][0]["args"],
                         ["arc-agent", "--config", "/etc/arc/agent.yaml"])
        self.assertEqual(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0)
        probe = pod["containers"][0]["readinessProbe"]["exec"]["command"]
        self.assertEqual(probe, ["python", "/etc/arc/probe.py", "ready"])

    def test_agent_yaml_loads_with_the_agent_loader(self):
        kinds = self.render(guard="oidc", oidc_issuer=ISSUER, oidc_client_id="arc",
                            allow_impersonation=True)
        [config_map] = kinds["ConfigMap"]
        cfg = self.load_agent_yaml(config_map["data"])
        self.assertEqual(cfg.cluster, "prod-eu")
        self.assertEqual(cfg.relay.url, RELAY)
        self.assertEqual(cfg.relay.ca_pem, self.ca_pem.encode())
        self.assertIsNone(cfg.kubeconfig)   # in cluster: the service account
        self.assertEqual(sorted(cfg.guard.authenticator.issuers), [ISSUER])
        self.assertTrue(cfg.guard.allow_impersonation)

    def test_passthrough_agent_yaml(self):
        [config_map] = self.render(ca_pem=None)["ConfigMap"]
        self.assertNotIn("relay-ca.crt", config_map["data"])
        cfg = self.load_agent_yaml(config_map["data"])
        self.assertFalse(cfg.guard.impersonates)
        self.assertIsNone(cfg.relay.ca_pem)

    def load_agent_yaml(self, data):
        directory = tempfile.mkdtemp(prefix="arc-manifest-")
        token = os.path.join(directory, "agent-token")
        with open(token, "w") as f:
            f.write("t\n")
        for name, content in data.items():
            if name == "agent.yaml":
                self.assertIn("token_file: /var/run/secrets/arc/agent-token", content)
                content = content.replace("/var/run/secrets/arc/agent-token", token)
            with open(os.path.join(directory, name), "w") as f:
                f.write(content)
        return load_agent_config(os.path.join(directory, "agent.yaml"))

    def test_network_policy_allows_dns_relay_and_api_server_only(self):
        [policy] = self.render()["NetworkPolicy"]
        spec = policy["spec"]
        self.assertEqual(spec["policyTypes"], ["Ingress", "Egress"])
        self.assertNotIn("ingress", spec)
        dns, other = spec["egress"]
        self.assertEqual(dns["to"][0]["podSelector"], {"matchLabels": {"k8s-app": "kube-dns"}})
        self.assertEqual({p["port"] for p in dns["ports"]}, {53})
        self.assertEqual({(p["protocol"], p["port"]) for p in other["ports"]},
                         {("TCP", 8443), ("TCP", 443), ("TCP", 6443)})

    def test_namespace_and_image_options(self):
        kinds = self.render(namespace="tunnels", image="registry.example.com/arc:1.2",
                            replicas=2)
        for obj in self.objects:
            if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                self.assertEqual(obj["metadata"]["namespace"], "tunnels")
        [deployment] = kinds["Deployment"]
        self.assertEqual(deployment["spec"]["replicas"], 2)
        self.assertEqual(deployment["spec"]["template"]["spec"]["containers"][0]["image"],
                         "registry.example.com/arc:1.2")
        self.assertIn("kubectl -n tunnels create secret", self.text)

    def test_refusals_name_the_fix(self):
        cases = [
            (dict(guard="oidc"), "--oidc-issuer URL and --oidc-client-id"),
            (dict(guard="oidc", oidc_issuer="http://idp", oidc_client_id="a"), "https://"),
            (dict(allow_impersonation=True), "add --guard oidc"),
            (dict(namespace="Bad_NS"), "DNS label"),
            (dict(replicas=0), "at least 1"),
        ]
        for kwargs, expected in cases:
            with self.assertRaises(CommandError) as caught:
                agent.manifest("prod-eu", RELAY, **kwargs)
            self.assertIn(expected, str(caught.exception))
        for url in ("http://relay.example.com", "https://relay.example.com/path", "relay:443"):
            with self.assertRaises(CommandError) as caught:
                agent.manifest("prod-eu", url)
            self.assertIn("--relay-url", str(caught.exception))
        with self.assertRaises(CommandError):
            agent.manifest("Prod", RELAY)

    def test_command_line(self):
        directory = tempfile.mkdtemp(prefix="arc-manifest-")
        ca = os.path.join(directory, "ca.crt")
        with open(ca, "w") as f:
            f.write(self.ca_pem)
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from arc.cli.main import main; sys.exit(main())",
             "agent", "manifest", "prod-eu", "--relay-url", RELAY, "--relay-ca-file", ca,
             "--guard", "oidc", "--oidc-issuer", ISSUER, "--oidc-client-id", "arc"],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
        self.assertEqual(result.returncode, 0, result.stderr)
        kinds = by_kind(o for o in yaml.safe_load_all(result.stdout) if o)
        self.assertIn("ClusterRole", kinds)
        bad = subprocess.run(
            [sys.executable, "-c", "import sys; from arc.cli.main import main; sys.exit(main())",
             "agent", "manifest", "prod-eu", "--relay-url", RELAY, "--relay-ca-file",
             os.path.join(directory, "missing.crt")],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("cannot read the relay CA file", bad.stderr)


class ProbeTests(unittest.TestCase):
    """probe.py from the ConfigMap, run against real sockets on 127.0.0.1."""

    def setUp(self):
        self.server = socket.socket()
        self.addCleanup(self.server.close)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        directory = tempfile.mkdtemp(prefix="arc-probe-")
        self.script = os.path.join(directory, "probe.py")
        with open(self.script, "w") as f:
            f.write(agent.PROBE.format(host="127.0.0.1", port=self.port))

    def probe(self, check):
        env = dict(os.environ)
        env.pop("KUBERNETES_SERVICE_HOST", None)
        return subprocess.run([sys.executable, self.script, check], capture_output=True,
                              text=True, timeout=30, env=env)

    def connect(self):
        client = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.addCleanup(client.close)
        conn, _ = self.server.accept()
        self.addCleanup(conn.close)
        return client, conn

    def test_not_ready_without_a_tunnel(self):
        result = self.probe("ready")
        self.assertEqual(result.returncode, 1)
        self.assertIn("no connection to the relay 127.0.0.1:%d" % self.port, result.stderr)
        self.assertEqual(self.probe("alive").returncode, 0)

    def test_ready_and_alive_with_an_established_tunnel(self):
        self.connect()
        self.assertEqual(self.probe("ready").returncode, 0)
        self.assertEqual(self.probe("alive").returncode, 0)

    def test_not_alive_when_a_closed_tunnel_is_never_noticed(self):
        _, conn = self.connect()
        conn.close()       # the relay closed; this process never reads the EOF
        deadline = time.monotonic() + 10
        while self.probe("alive").returncode == 0:
            self.assertLess(time.monotonic(), deadline, "socket never reached CLOSE_WAIT")
            time.sleep(0.1)
        result = self.probe("alive")
        self.assertEqual(result.returncode, 1)
        self.assertIn("CLOSE_WAIT", result.stderr)


# -- the relay's kustomization ----------------------------------------------------------


class RelayManifestTests(SchemaMixin, unittest.TestCase):
    def setUp(self):
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise unittest.SkipTest("kubectl is not on PATH: cannot render the kustomization")
        result = subprocess.run([kubectl, "kustomize", os.path.join(ROOT, "deploy", "kubernetes",
                                                                    "relay")],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.objects = [o for o in yaml.safe_load_all(result.stdout) if o]
        self.kinds = by_kind(self.objects)

    def test_objects_match_the_schemas(self):
        self.assertEqual(sorted(self.kinds), ["ConfigMap", "Deployment", "Namespace",
                                              "NetworkPolicy", "Service"])
        for obj in self.objects:
            if obj["kind"] != "Namespace":
                self.assertEqual(obj["metadata"]["namespace"], "arc-relay")
        self.validate(self.objects)

    def test_deployment(self):
        [deployment] = self.kinds["Deployment"]
        spec = deployment["spec"]
        self.assertEqual((spec["replicas"], spec["strategy"]["type"]), (1, "Recreate"))
        pod = spec["template"]["spec"]
        self.assertHardenedPod(pod)
        self.assertFalse(pod["automountServiceAccountToken"])
        [container] = pod["containers"]
        self.assertEqual(container["readinessProbe"]["httpGet"]["path"], "/readyz")
        self.assertEqual(container["livenessProbe"]["httpGet"]["scheme"], "HTTPS")
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        self.assertNotIn("subPath", mounts["config"])   # else ConfigMap updates never arrive
        [config_map] = self.kinds["ConfigMap"]
        self.assertEqual(config_map["metadata"]["name"], "arc-relay")   # no hash suffix
        config_path = container["args"][container["args"].index("--config") + 1]
        self.assertEqual(os.path.dirname(config_path), mounts["config"]["mountPath"])

    def test_relay_yaml_loads_with_the_relay_loader(self):
        [config_map] = self.kinds["ConfigMap"]
        directory = tempfile.mkdtemp(prefix="arc-manifest-")
        for name in ("tls.crt", "tls.key"):
            open(os.path.join(directory, name), "w").close()
        path = os.path.join(directory, "relay.yaml")
        with open(path, "w") as f:
            f.write(config_map["data"]["relay.yaml"].replace("/etc/arc/tls/", ""))
        cfg = load_relay_config(path)
        self.assertEqual(cfg.listen, "tcp:8443")
        self.assertEqual(cfg.registry.clusters, {})


# -- the Dockerfile and the systemd unit ------------------------------------------------


def dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


class DockerfileTests(unittest.TestCase):
    def setUp(self):
        self.steps = dockerfile_instructions()
        self.names = [name for name, _ in self.steps]

    def test_base_image(self):
        self.assertEqual(self.steps[0], ("FROM", "python:3.11-slim"))

    def test_runs_as_a_fixed_non_root_user(self):
        users = [args for name, args in self.steps if name == "USER"]
        self.assertTrue(users, "no USER instruction: the container would run as root")
        uid = users[-1].split(":")[0]
        self.assertNotIn(uid, ("root", "0"))
        self.assertTrue(uid.isdigit(), "a numeric uid lets Kubernetes check runAsNonRoot")
        last_user = len(self.names) - 1 - self.names[::-1].index("USER")
        self.assertNotIn("RUN", self.names[last_user:])
        creates = [args for name, args in self.steps if name == "RUN" and "useradd" in args]
        self.assertIn("--uid %s" % uid, creates[0])

    def test_package_installed_then_plugin_cache_written_as_root(self):
        runs = [(i, args) for i, (name, args) in enumerate(self.steps) if name == "RUN"]
        install = [i for i, args in runs if re.search(r"\bpip install\b.*(/src|\s\.)", args)]
        cache = [i for i, args in runs
                 if "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
                 in args]
        self.assertTrue(install and cache, self.steps)
        self.assertLess(install[0], cache[0])
        self.assertLess(cache[0], self.names.index("USER"))

    def test_copied_sources_exist(self):
        for name, args in self.steps:
            if name == "COPY":
                for source in args.split()[:-1]:
                    self.assertTrue(os.path.exists(os.path.join(ROOT, source)), source)

    def test_entrypoint_is_twistd_in_the_foreground(self):
        [entrypoint] = [args for name, args in self.steps if name == "ENTRYPOINT"]
        argv = json.loads(entrypoint)
        self.assertEqual(argv[:2], ["twistd", "-n"])
        self.assertIn("--pidfile=", argv)   # nothing written: the root filesystem is read-only
        [cmd] = [args for name, args in self.steps if name == "CMD"]
        self.assertEqual(json.loads(cmd)[0], "arc-relay")


class SystemdUnitTests(unittest.TestCase):
    path = os.path.join(ROOT, "deploy", "systemd", "arc-relay.service")

    def setUp(self):
        self.entries = {}
        section = None
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("["):
                    section = line.strip("[]")
                    continue
                key, _, value = line.partition("=")
                self.entries.setdefault((section, key), []).append(value)

    def value(self, key, section="Service"):
        return self.entries[(section, key)][-1]

    def test_hardening(self):
        self.assertEqual(self.value("User"), "arc-relay")
        self.assertEqual(self.value("ProtectSystem"), "strict")
        self.assertEqual(self.value("NoNewPrivileges"), "yes")
        self.assertEqual(self.value("CapabilityBoundingSet"), "")
        self.assertEqual(self.value("ProtectHome"), "yes")
        self.assertEqual(self.value("PrivateTmp"), "yes")
        self.assertIn("@system-service", self.value("SystemCallFilter"))

    def test_runs_the_relay_in_the_foreground_and_reloads_with_sighup(self):
        argv = shlex.split(self.value("ExecStart"))
        self.assertTrue(argv[0].endswith("/twistd"))
        self.assertIn("--nodaemon", argv)
        self.assertIn("--pidfile=", argv)
        self.assertEqual(argv[argv.index("arc-relay") + 1:], ["--config", "/etc/arc/relay.yaml"])
        self.assertEqual(self.value("ExecReload"), "/bin/kill -HUP $MAINPID")

    def test_systemd_accepts_the_unit(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        directory = tempfile.mkdtemp(prefix="arc-unit-")
        unit = os.path.join(directory, "arc-relay.service")
        with open(self.path) as f:
            text = f.read()
        # verify wants ExecStart's binary to exist; everything else is checked as is.
        with open(unit, "w") as f:
            f.write(text.replace("/opt/arc/bin/twistd", sys.executable))
        result = subprocess.run([analyze, "verify", unit], capture_output=True, text=True,
                                timeout=60)
        problems = [line for line in result.stderr.splitlines() if "arc-relay.service" in line]
        self.assertEqual((result.returncode, problems), (0, []), result.stderr)

"""Tests for arc.kube.kubeconfig: finding the upstream apiserver, and writing contexts."""

import base64
import datetime
import os
import stat

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from arc.errors import ConfigError
from arc.kube.kubeconfig import (
    Upstream,
    default_kubeconfig_path,
    load_upstream,
    merge_context,
    remove_context,
)


def _certificate_and_key():
    """A self-signed certificate and its key, as PEM bytes."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


CERT_PEM, KEY_PEM = _certificate_and_key()
TOKEN = "s3cr3t-token-value"


def b64(data):
    return base64.b64encode(data).decode("ascii")


def kubeconfig(clusters=(), users=(), contexts=(), current=None):
    """A kubeconfig document from ``(name, body)`` pairs."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": n, "cluster": b} for n, b in clusters],
        "users": [{"name": n, "user": b} for n, b in users],
        "contexts": [{"name": n, "context": b} for n, b in contexts],
    }
    if current is not None:
        document["current-context"] = current
    return document


def simple_kubeconfig(server="https://api.example.com:6443", user=None, current="prod"):
    return kubeconfig(
        clusters=[("prod-cluster", {"server": server,
                                    "certificate-authority-data": b64(CERT_PEM)})],
        users=[("prod-user", {"token": TOKEN} if user is None else user)],
        contexts=[("prod", {"cluster": "prod-cluster", "user": "prod-user",
                            "namespace": "apps"})],
        current=current,
    )


class FilesMixin:
    def directory(self):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def write(self, path, content, mode=0o600):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not isinstance(content, (str, bytes)):
            content = yaml.safe_dump(content)
        with open(path, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(path, mode)
        return path

    def read_yaml(self, path):
        with open(path, "rb") as f:
            return yaml.safe_load(f)

    def assertConfigError(self, function, *args, **kwargs):
        return self.assertRaises(ConfigError, function, *args, **kwargs)


class LoadKubeconfigTests(FilesMixin, TestCase):
    """load_upstream reading kubeconfig files."""

    def load(self, document, **kwargs):
        path = self.write(os.path.join(self.directory(), "config"), document)
        return load_upstream(path, environ={}, **kwargs), path

    def test_current_context(self):
        upstream, path = self.load(simple_kubeconfig())
        self.assertEqual(
            upstream,
            Upstream(server="https://api.example.com:6443", host="api.example.com", port=6443,
                     ca_pem=CERT_PEM, token=TOKEN, namespace="apps",
                     source=f"kubeconfig {path} context prod"))

    def test_explicit_context(self):
        document = simple_kubeconfig(current="prod")
        document["clusters"].append({"name": "dev-cluster",
                                     "cluster": {"server": "https://dev.example.com"}})
        document["contexts"].append({"name": "dev", "context": {"cluster": "dev-cluster"}})
        upstream, _ = self.load(document, context="dev")
        self.assertEqual((upstream.host, upstream.port, upstream.ca_pem, upstream.token),
                         ("dev.example.com", 443, None, None))

    def test_no_context(self):
        error = self.assertConfigError(self.load, simple_kubeconfig(current=None))
        self.assertIn("current-context", str(error))
        self.assertIn("kubectl config use-context", str(error))

    def test_unknown_context(self):
        error = self.assertConfigError(self.load, simple_kubeconfig(), context="staging")
        self.assertIn("'staging' not found (contexts: prod)", str(error))

    def test_undefined_cluster(self):
        document = simple_kubeconfig()
        document["clusters"] = []
        error = self.assertConfigError(self.load, document)
        self.assertIn('context "prod" cluster', str(error))
        self.assertIn("'prod-cluster' is not defined", str(error))

    def test_missing_explicit_file(self):
        path = os.path.join(self.directory(), "nope")
        error = self.assertConfigError(load_upstream, path, environ={})
        self.assertEqual(error.file, path)

    def test_relative_paths_resolve_against_the_kubeconfig_directory(self):
        directory = self.directory()
        self.write(os.path.join(directory, "pki", "ca.crt"), CERT_PEM)
        self.write(os.path.join(directory, "pki", "client.crt"), CERT_PEM)
        self.write(os.path.join(directory, "pki", "client.key"), KEY_PEM)
        self.write(os.path.join(directory, "token"), TOKEN + "\n")
        path = self.write(os.path.join(directory, "config"), kubeconfig(
            clusters=[("c", {"server": "https://10.0.0.1", "certificate-authority": "pki/ca.crt",
                             "tls-server-name": "kubernetes"})],
            users=[("u", {"client-certificate": "pki/client.crt",
                          "client-key": "pki/client.key", "tokenFile": "token"})],
            contexts=[("x", {"cluster": "c", "user": "u"})], current="x"))
        # The working directory (trial's) holds no pki/: only the file's directory does.
        upstream = load_upstream(path, environ={})
        self.assertEqual(upstream.ca_pem, CERT_PEM)
        self.assertEqual(upstream.client_cert_pem, CERT_PEM)
        self.assertEqual(upstream.client_key_pem, KEY_PEM)
        self.assertEqual(upstream.token, TOKEN)
        self.assertEqual(upstream.token_file, os.path.join(directory, "token"))
        self.assertEqual(upstream.tls_server_name, "kubernetes")

    def test_missing_referenced_file(self):
        document = simple_kubeconfig()
        document["clusters"][0]["cluster"] = {"server": "https://a",
                                              "certificate-authority": "ca.crt"}
        error = self.assertConfigError(self.load, document)
        self.assertTrue(error.file.endswith(os.sep + "ca.crt"))
        self.assertIn('fix certificate-authority of cluster "prod-cluster"', str(error))

    def test_data_fields(self):
        upstream, _ = self.load(simple_kubeconfig(user={
            "client-certificate-data": b64(CERT_PEM), "client-key-data": b64(KEY_PEM)}))
        self.assertEqual((upstream.client_cert_pem, upstream.client_key_pem, upstream.token),
                         (CERT_PEM, KEY_PEM, None))

    def test_data_field_not_base64(self):
        document = simple_kubeconfig()
        document["clusters"][0]["cluster"]["certificate-authority-data"] = CERT_PEM.decode()
        error = self.assertConfigError(self.load, document)
        self.assertEqual(error.key, 'cluster "prod-cluster" certificate-authority-data')
        self.assertIn("is not base64", str(error))

    def test_data_field_not_pem(self):
        document = simple_kubeconfig()
        document["clusters"][0]["cluster"]["certificate-authority-data"] = b64(b"hello")
        error = self.assertConfigError(self.load, document)
        self.assertIn("does not hold a PEM certificate", str(error))

    def test_certificate_without_key(self):
        error = self.assertConfigError(
            self.load, simple_kubeconfig(user={"client-certificate-data": b64(CERT_PEM)}))
        self.assertEqual(error.key, 'user "prod-user" client-key')

    def test_ipv6_server(self):
        upstream, _ = self.load(simple_kubeconfig(server="https://[::1]:6443"))
        self.assertEqual((upstream.host, upstream.port), ("::1", 6443))
        upstream, _ = self.load(simple_kubeconfig(server="https://[fd00::10]"))
        self.assertEqual((upstream.host, upstream.port), ("fd00::10", 443))

    def test_invalid_server(self):
        for server in ["https://[::1", "https://host:99999", "api.example.com:6443", "https://"]:
            error = self.assertConfigError(self.load, simple_kubeconfig(server=server))
            self.assertEqual(error.key, 'cluster "prod-cluster" server')

    def test_plaintext_server_refused(self):
        error = self.assertConfigError(self.load, simple_kubeconfig(server="http://127.0.0.1"))
        self.assertIn("arc requires TLS", str(error))

    def test_plaintext_server_allowed(self):
        upstream, _ = self.load(simple_kubeconfig(server="http://127.0.0.1"),
                                allow_plaintext=True)
        self.assertEqual((upstream.host, upstream.port), ("127.0.0.1", 80))

    def test_insecure_with_ca(self):
        document = simple_kubeconfig()
        document["clusters"][0]["cluster"]["insecure-skip-tls-verify"] = True
        error = self.assertConfigError(self.load, document)
        self.assertIn("remove one of them", str(error))

    def test_insecure(self):
        document = simple_kubeconfig()
        document["clusters"][0]["cluster"] = {"server": "https://a",
                                              "insecure-skip-tls-verify": True}
        upstream, _ = self.load(document)
        self.assertTrue(upstream.insecure_skip_tls_verify)

    def test_exec_plugin_refused(self):
        error = self.assertConfigError(self.load, simple_kubeconfig(user={
            "exec": {"apiVersion": "client.authentication.k8s.io/v1",
                     "command": "gke-gcloud-auth-plugin"}}))
        self.assertEqual(error.key, 'user "prod-user" exec')
        self.assertIn("exec credential plugins are not supported", str(error))
        self.assertIn("a token, a tokenFile or a client certificate", str(error))

    def test_auth_provider_refused(self):
        error = self.assertConfigError(self.load, simple_kubeconfig(user={
            "auth-provider": {"name": "oidc"}}))
        self.assertIn("a token, a tokenFile or a client certificate", str(error))

    def test_unsupported_user_settings_refused(self):
        for key, value in [("username", "admin"), ("as", "system:admin")]:
            error = self.assertConfigError(self.load, simple_kubeconfig(user={
                key: value, "token": TOKEN}))
            self.assertEqual(error.key, f'user "prod-user" {key}')
            self.assertIn("not supported for the agent's upstream", str(error))

    def test_proxy_url_refused(self):
        document = simple_kubeconfig()
        document["clusters"][0]["cluster"]["proxy-url"] = "socks5://127.0.0.1:1080"
        error = self.assertConfigError(self.load, document)
        self.assertIn("make the apiserver reachable directly", str(error))

    def test_values_of_the_wrong_type(self):
        cases = [
            (("clusters", 0, "cluster", "server"), 6443, 'cluster "prod-cluster" server'),
            (("clusters", 0, "cluster", "insecure-skip-tls-verify"), "yes",
             'cluster "prod-cluster" insecure-skip-tls-verify'),
            (("users", 0, "user"), ["token"], 'user "prod-user"'),
            (("contexts", 0, "name"), 7, "contexts"),
            (("current-context",), ["prod"], "current-context"),
        ]
        for keys, value, where in cases:
            document = simple_kubeconfig()
            parent = document
            for key in keys[:-1]:
                parent = parent[key]
            parent[keys[-1]] = value
            error = self.assertConfigError(self.load, document)
            self.assertEqual(error.key, where)

    def test_invalid_yaml_does_not_show_the_text(self):
        error = self.assertConfigError(
            self.load, f"users:\n- name: u\n  user:\n    token: {TOKEN}\n  : bad: [\n")
        self.assertIn("not valid YAML at line", str(error))
        self.assertNotIn(TOKEN, str(error))

    def test_not_a_mapping(self):
        self.assertConfigError(self.load, "- just\n- a list\n")
        self.assertConfigError(self.load, "clusters: {a: b}\n")
        self.assertConfigError(self.load, "clusters:\n- cluster: {server: https://a}\n")

    def test_repr_hides_secrets(self):
        upstream, _ = self.load(simple_kubeconfig(user={
            "token": TOKEN, "client-certificate-data": b64(CERT_PEM),
            "client-key-data": b64(KEY_PEM)}))
        text = repr(upstream)
        self.assertIn("https://api.example.com:6443", text)
        for secret in [TOKEN, KEY_PEM.decode(), b64(KEY_PEM), "PRIVATE KEY"]:
            self.assertNotIn(secret, text)
        self.assertNotIn(TOKEN, str(upstream))

    def test_bearer_token_follows_rotation(self):
        directory = self.directory()
        token_path = self.write(os.path.join(directory, "token"), "first")
        path = self.write(os.path.join(directory, "config"), simple_kubeconfig(
            user={"tokenFile": token_path}))
        upstream = load_upstream(path, environ={})
        self.assertEqual(upstream.bearer_token(), "first")
        self.write(token_path, "second\n")
        self.assertEqual(upstream.bearer_token(), "second")
        os.remove(token_path)
        self.assertConfigError(upstream.bearer_token)

    def test_empty_token_file(self):
        directory = self.directory()
        token_path = self.write(os.path.join(directory, "token"), "\n")
        error = self.assertConfigError(self.load, simple_kubeconfig(
            user={"tokenFile": token_path}))
        self.assertEqual(error.file, token_path)
        self.assertIn("empty", str(error))


class SearchOrderTests(FilesMixin, TestCase):
    """Where load_upstream looks: $KUBECONFIG, ~/.kube/config, the service account."""

    def test_kubeconfig_list_merges_first_wins(self):
        first, second = self.directory(), self.directory()
        self.write(os.path.join(second, "ca.crt"), CERT_PEM)
        a = self.write(os.path.join(first, "a"), kubeconfig(
            clusters=[("shared", {"server": "https://from-a"})],
            contexts=[("one", {"cluster": "shared"})],
            current="one"))
        b = self.write(os.path.join(second, "b"), kubeconfig(
            clusters=[("shared", {"server": "https://from-b"}),
                      ("only-b", {"server": "https://b-only",
                                  "certificate-authority": "ca.crt"})],
            contexts=[("one", {"cluster": "only-b"}), ("two", {"cluster": "only-b"})],
            current="two"))
        missing = os.path.join(first, "missing")
        environ = {"KUBECONFIG": os.pathsep.join([missing, a, "", b])}
        home = self.directory()
        self.write(os.path.join(home, ".kube", "config"), simple_kubeconfig())

        upstream = load_upstream(environ=environ, home=home)
        self.assertEqual(upstream.host, "from-a")
        self.assertEqual(upstream.source, f"kubeconfig {a}{os.pathsep}{b} context one")

        upstream = load_upstream(context="two", environ=environ, home=home)
        self.assertEqual(upstream.host, "b-only")
        self.assertEqual(upstream.ca_pem, CERT_PEM)

    def test_home_kubeconfig(self):
        home = self.directory()
        self.write(os.path.join(home, ".kube", "config"), simple_kubeconfig())
        upstream = load_upstream(environ={}, home=home)
        self.assertEqual(upstream.host, "api.example.com")

    def in_cluster(self, host="10.96.0.1"):
        root = self.directory()
        self.write(os.path.join(root, "token"), TOKEN + "\n")
        self.write(os.path.join(root, "ca.crt"), CERT_PEM)
        self.write(os.path.join(root, "namespace"), "arc-system")
        environ = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": "443"}
        return root, environ

    def test_in_cluster(self):
        root, environ = self.in_cluster()
        upstream = load_upstream(environ=environ, home=self.directory(), in_cluster_root=root)
        self.assertEqual(
            upstream,
            Upstream(server="https://10.96.0.1:443", host="10.96.0.1", port=443,
                     ca_pem=CERT_PEM, token=TOKEN, token_file=os.path.join(root, "token"),
                     namespace="arc-system", source="in-cluster service account"))

    def test_in_cluster_ipv6(self):
        root, environ = self.in_cluster(host="fd00:10:96::1")
        upstream = load_upstream(environ=environ, home=self.directory(), in_cluster_root=root)
        self.assertEqual(upstream.server, "https://[fd00:10:96::1]:443")
        self.assertEqual(upstream.host, "fd00:10:96::1")

    def test_in_cluster_when_kubeconfig_list_is_all_missing(self):
        root, environ = self.in_cluster()
        environ["KUBECONFIG"] = os.path.join(root, "absent")
        upstream = load_upstream(environ=environ, in_cluster_root=root)
        self.assertEqual(upstream.source, "in-cluster service account")

    def test_in_cluster_without_token(self):
        root, environ = self.in_cluster()
        os.remove(os.path.join(root, "token"))
        error = self.assertConfigError(load_upstream, environ=environ, home=self.directory(),
                                       in_cluster_root=root)
        self.assertIn("automountServiceAccountToken", str(error))

    def test_nothing_found(self):
        home = self.directory()
        error = self.assertConfigError(load_upstream, environ={}, home=home,
                                       in_cluster_root=self.directory())
        self.assertIn(os.path.join(home, ".kube", "config"), str(error))
        self.assertIn("KUBERNETES_SERVICE_HOST", str(error))

    def test_context_without_kubeconfig(self):
        root, environ = self.in_cluster()
        error = self.assertConfigError(load_upstream, context="prod", environ=environ,
                                       home=self.directory(), in_cluster_root=root)
        self.assertIn("'prod' was asked for", str(error))

    def test_default_kubeconfig_path(self):
        self.assertEqual(
            default_kubeconfig_path(environ={"KUBECONFIG": os.pathsep.join(["", "/a", "/b"])}),
            "/a")
        self.assertEqual(default_kubeconfig_path(environ={}, home="/home/me"),
                         os.path.join("/home/me", ".kube", "config"))


CLUSTER = {"server": "https://127.0.0.1:7443", "tls-server-name": "demo.arc.localhost",
           "certificate-authority-data": b64(CERT_PEM)}
USER = {"token": "relay-token"}


def foreign_kubeconfig():
    """A kubeconfig with entries arc must keep."""
    document = simple_kubeconfig()
    document["preferences"] = {"colors": True}
    document["extensions"] = [{"name": "x", "extension": {"keep": "me"}}]
    return document


class MergeContextTests(FilesMixin, TestCase):
    """merge_context and remove_context."""

    def merge(self, path, context="demo", **kwargs):
        return merge_context(path, context=context, cluster_entry=CLUSTER, user_entry=USER,
                             **kwargs)

    def test_new_file(self):
        path = os.path.join(self.directory(), "new", ".kube", "config")
        self.assertEqual(self.merge(path), path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        self.assertEqual(self.read_yaml(path), {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "arc-demo", "cluster": CLUSTER}],
            "users": [{"name": "arc-demo", "user": USER}],
            "contexts": [{"name": "demo", "context": {"cluster": "arc-demo",
                                                      "user": "arc-demo"}}],
            "current-context": "demo"})
        self.assertFalse(os.path.exists(path + ".arc.bak"))
        self.assertEqual(os.listdir(os.path.dirname(path)), ["config"])

    def test_written_context_loads(self):
        path = os.path.join(self.directory(), "config")
        self.merge(path)
        upstream = load_upstream(path, "demo", environ={})
        self.assertEqual((upstream.host, upstream.port, upstream.tls_server_name,
                          upstream.ca_pem, upstream.token),
                         ("127.0.0.1", 7443, "demo.arc.localhost", CERT_PEM, "relay-token"))

    def test_keeps_everything_else(self):
        path = self.write(os.path.join(self.directory(), "config"), foreign_kubeconfig(),
                          mode=0o644)
        with open(path, "rb") as f:
            before = f.read()
        self.merge(path)
        after = self.read_yaml(path)
        expected = foreign_kubeconfig()
        expected["clusters"].append({"name": "arc-demo", "cluster": CLUSTER})
        expected["users"].append({"name": "arc-demo", "user": USER})
        expected["contexts"].append({"name": "demo", "context": {"cluster": "arc-demo",
                                                                 "user": "arc-demo"}})
        self.assertEqual(after, expected)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)
        with open(path + ".arc.bak", "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(stat.S_IMODE(os.stat(path + ".arc.bak").st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(os.path.dirname(path))), ["config", "config.arc.bak"])

    def test_set_current(self):
        path = self.write(os.path.join(self.directory(), "config"), foreign_kubeconfig())
        self.merge(path, set_current=True)
        self.assertEqual(self.read_yaml(path)["current-context"], "demo")

    def test_update_keeps_namespace_and_order(self):
        path = os.path.join(self.directory(), "config")
        self.merge(path)
        merge_context(path, context="other", cluster_entry=CLUSTER, user_entry=USER)
        document = self.read_yaml(path)
        document["contexts"][0]["context"]["namespace"] = "apps"
        self.write(path, document)

        updated = dict(CLUSTER, server="https://127.0.0.1:8443")
        merge_context(path, context="demo", cluster_entry=updated, user_entry=USER)
        document = self.read_yaml(path)
        self.assertEqual([c["name"] for c in document["clusters"]], ["arc-demo", "arc-other"])
        self.assertEqual(document["clusters"][0]["cluster"], updated)
        self.assertEqual(document["contexts"][0], {"name": "demo", "context": {
            "cluster": "arc-demo", "user": "arc-demo", "namespace": "apps"}})
        self.assertEqual(document["current-context"], "demo")

    def test_refuses_foreign_context(self):
        path = self.write(os.path.join(self.directory(), "config"), foreign_kubeconfig())
        with open(path, "rb") as f:
            before = f.read()
        error = self.assertConfigError(self.merge, path, context="prod")
        self.assertEqual(error.key, 'context "prod"')
        self.assertIn("already exists and uses cluster 'prod-cluster'", str(error))
        self.assertIn("choose another context name", str(error))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_invalid_yaml_is_never_overwritten(self):
        path = self.write(os.path.join(self.directory(), "config"), "clusters: [\n")
        self.assertConfigError(self.merge, path)
        self.assertConfigError(remove_context, path, "demo")
        with open(path) as f:
            self.assertEqual(f.read(), "clusters: [\n")
        self.assertFalse(os.path.exists(path + ".arc.bak"))

    def test_symlink_target_is_replaced(self):
        directory = self.directory()
        real = self.write(os.path.join(directory, "dotfiles", "kubeconfig"),
                          foreign_kubeconfig())
        link = os.path.join(directory, "config")
        os.symlink(real, link)
        self.merge(link)
        self.assertTrue(os.path.islink(link))
        self.assertEqual(self.read_yaml(real)["contexts"][-1]["name"], "demo")

    def test_failed_write_changes_nothing(self):
        directory = self.directory()
        path = self.write(os.path.join(directory, "config"), foreign_kubeconfig())

        def replace(source, destination):
            raise PermissionError(13, "Permission denied")

        self.patch(os, "replace", replace)
        error = self.assertConfigError(self.merge, path)
        self.assertIn("cannot write: Permission denied", str(error))
        self.assertEqual(os.listdir(directory), ["config"])
        self.assertEqual(self.read_yaml(path), foreign_kubeconfig())

    def test_remove(self):
        path = self.write(os.path.join(self.directory(), "config"), foreign_kubeconfig())
        self.merge(path, set_current=True)
        self.assertEqual(remove_context(path, "demo"), path)
        document = self.read_yaml(path)
        expected = foreign_kubeconfig()
        expected["current-context"] = ""
        self.assertEqual(document, expected)

    def test_remove_nothing(self):
        path = self.write(os.path.join(self.directory(), "config"), foreign_kubeconfig())
        remove_context(path, "demo")
        self.assertFalse(os.path.exists(path + ".arc.bak"))
        missing = os.path.join(self.directory(), "config")
        remove_context(missing, "demo")
        self.assertFalse(os.path.exists(missing))

    def test_remove_refuses_foreign_context(self):
        path = self.write(os.path.join(self.directory(), "config"), foreign_kubeconfig())
        error = self.assertConfigError(remove_context, path, "prod")
        self.assertIn("kubectl config delete-context prod", str(error))
        self.assertEqual(self.read_yaml(path), foreign_kubeconfig())

    @settings(max_examples=30, deadline=None)
    @given(names=st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
                          unique=True, max_size=4).filter(
                              lambda names: "demo" not in names
                              and not any(n.startswith("arc-") for n in names)),
           current=st.booleans())
    def test_merge_then_remove_restores_other_entries(self, names, current):
        document = kubeconfig(
            clusters=[(n, {"server": f"https://{n}"}) for n in names],
            users=[(n, {"token": n}) for n in names],
            contexts=[(n, {"cluster": n, "user": n}) for n in names],
            current=names[0] if names and current else None)
        path = self.write(os.path.join(self.directory(), "config"), document)
        self.merge(path)
        remove_context(path, "demo")
        restored = self.read_yaml(path)
        for key in ("clusters", "users", "contexts"):
            self.assertEqual(restored[key], document[key])
        self.assertEqual(restored.get("current-context") or None,
                         document.get("current-context"))

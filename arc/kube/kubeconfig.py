"""Kubeconfig files: find the agent's upstream apiserver, and add arc contexts.

Reading follows the rules every Kubernetes client follows (an explicit file,
else ``$KUBECONFIG``, else ``~/.kube/config``, else the pod's service
account), so the agent reaches its apiserver the way ``kubectl`` would.

Writing adds or removes one context, with the cluster and user it uses, and
leaves everything else in the file as it was. A context counts as arc's when
its cluster's name starts with the owner prefix (``arc-``); arc never
replaces or removes a context that is not its own.
"""

import base64
import binascii
import os
import stat
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from arc.errors import ConfigError
from arc.pki import write_private

IN_CLUSTER_ROOT = "/var/run/secrets/kubernetes.io/serviceaccount"

# (list key, entry key) of the three named maps of a kubeconfig.
_MAPS = (("clusters", "cluster"), ("users", "user"), ("contexts", "context"))

_CREDENTIALS_FIX = (
    "give the agent a user with a token, a tokenFile or a client certificate "
    "(client-certificate and client-key) instead, such as a service account token "
    "from `kubectl create token`"
)
_UNSUPPORTED_USER_FIELDS = {
    "exec": "exec credential plugins are not supported for the agent's upstream",
    "auth-provider": "auth-provider plugins are not supported for the agent's upstream",
    "username": "basic authentication is not supported for the agent's upstream",
    "as": "impersonation is not supported for the agent's upstream",
}


@dataclass(frozen=True)
class Upstream:
    """Where the agent's kube-apiserver is and how to authenticate to it.

    ``ca_pem`` of ``None`` means the system's trust store. ``token`` is the
    bearer token when loaded; when ``token_file`` is set, use
    :meth:`bearer_token` to follow rotations. The repr leaves out the token
    and all key and certificate bytes, so an Upstream can be logged.
    """

    server: str
    host: str
    port: int = 443
    ca_pem: bytes | None = field(default=None, repr=False)
    tls_server_name: str | None = None
    insecure_skip_tls_verify: bool = False
    client_cert_pem: bytes | None = field(default=None, repr=False)
    client_key_pem: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    namespace: str | None = None
    source: str = ""

    def bearer_token(self):
        """The token to send now: ``token_file`` read afresh when set.

        Service account tokens are rotated on disk by the kubelet, so a
        long-running agent calls this for each new upstream connection.
        """
        if self.token_file is None:
            return self.token
        return _read_token(self.token_file, f"check the token file of {self.source}")


def load_upstream(
    kubeconfig=None,
    context=None,
    environ=None,
    home=None,
    in_cluster_root=IN_CLUSTER_ROOT,
    allow_plaintext=False,
):
    """Find the apiserver the agent forwards to, the way kubectl finds it.

    Looks at, in order: the ``kubeconfig`` file if given; the files listed in
    ``$KUBECONFIG`` (merged: for each cluster, user, context and the
    current-context, the first file defining it wins; missing files are
    skipped); ``~/.kube/config``; and finally the pod's service account under
    ``in_cluster_root``. ``context`` defaults to the current-context.
    ``http://`` servers are refused unless ``allow_plaintext`` is true.
    Raises :class:`ConfigError` naming the file and entry at fault.
    """
    environ = os.environ if environ is None else environ
    files, looked_at = _kubeconfig_files(kubeconfig, environ, home)
    if files:
        return _from_kubeconfig(files, context, allow_plaintext)
    if context is not None:
        raise ConfigError(
            f"context {context!r} was asked for, but no kubeconfig exists (looked at "
            f"{looked_at}); point the agent at the kubeconfig that defines it",
        )
    return _from_service_account(environ, in_cluster_root, looked_at)


def _kubeconfig_paths(environ):
    """The files listed in ``$KUBECONFIG``, without blanks or repeats."""
    listed = environ.get("KUBECONFIG", "").split(os.pathsep)
    return list(dict.fromkeys(path for path in listed if path))


def _home_kubeconfig(home):
    home = os.path.expanduser("~") if home is None else os.fspath(home)
    return os.path.join(home, ".kube", "config")


def _kubeconfig_files(kubeconfig, environ, home):
    """Existing kubeconfig files to merge, and a description of where we looked."""
    if kubeconfig is not None:
        path = os.path.abspath(os.fspath(kubeconfig))
        if not os.path.exists(path):
            raise ConfigError("kubeconfig file not found; check the path given to the agent",
                              file=path)
        return [path], path
    candidates = _kubeconfig_paths(environ)
    if candidates:
        looked_at = f"$KUBECONFIG={os.pathsep.join(candidates)}"
    else:
        candidates = [_home_kubeconfig(home)]
        looked_at = candidates[0]
    existing = [os.path.abspath(path) for path in candidates if os.path.exists(path)]
    return existing, looked_at


def _read_bytes(path, fix):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}; {fix}", file=path) from None


def _read_token(path, fix):
    try:
        token = _read_bytes(path, fix).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"the token file is not text; {fix}", file=path) from None
    if not token:
        raise ConfigError(f"the token file is empty; {fix}", file=path)
    return token


def _parse_document(raw, path):
    """The mapping a kubeconfig file holds (empty for an empty file).

    YAML errors are reported by position only: the text around the error
    could be a token.
    """
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "unreadable text"
        raise ConfigError(f"not valid YAML{where} ({problem}); fix the file", file=path) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError("not a kubeconfig (the top level is not a mapping); fix the file",
                          file=path)
    return document


def _entries(document, plural, singular, path):
    """The ``(name, body)`` pairs of one named map of a kubeconfig document."""
    items = document.get(plural)
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"must be a list of entries with a name and a {singular}; fix the file",
                          file=path, key=plural)
    entries = []
    for number, item in enumerate(items, 1):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise ConfigError(f"entry {number} has no name (a string); name it or remove it",
                              file=path, key=plural)
        body = item.get(singular) or {}
        if not isinstance(body, dict):
            raise ConfigError(f"{singular} must be a mapping; fix the file",
                              file=path, key=f'{singular} "{name}"')
        entries.append((name, body))
    return entries


class _Entry:
    """One named cluster, user or context of a kubeconfig, read with errors saying where."""

    def __init__(self, kind, name, body, path):
        self.kind = kind
        self.name = name
        self.body = body
        self.path = path

    def error(self, key, reason):
        return ConfigError(reason, file=self.path, key=f'{self.kind} "{self.name}" {key}')

    def fix(self, key):
        return (f'fix {key} of {self.kind} "{self.name}" in {self.path} '
                "(a relative path is resolved against that file's directory)")

    def string(self, key):
        value = self.body.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(key, "must be a string; fix the value")
        return value or None

    def flag(self, key):
        value = self.body.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def path_of(self, key):
        """The file ``key`` names, resolved like kubectl: against the kubeconfig's directory."""
        value = self.string(key)
        return os.path.join(os.path.dirname(self.path), value) if value else None

    def pem(self, key, what, is_valid):
        """The PEM bytes of ``KEY-data`` (base64) or of the file ``KEY`` names, or None."""
        encoded = self.string(f"{key}-data")
        if encoded:
            try:
                data = base64.b64decode("".join(encoded.split()), validate=True)
            except binascii.Error:
                raise self.error(f"{key}-data", f"is not base64; put the base64 of a PEM {what} "
                                 f"here, or the path of a PEM file in {key}") from None
            if not is_valid(data):
                raise self.error(f"{key}-data", f"does not hold a PEM {what}; "
                                 f"put the base64 of a PEM {what} here")
            return data
        path = self.path_of(key)
        if path is None:
            return None
        data = _read_bytes(path, self.fix(key))
        if not is_valid(data):
            raise ConfigError(f"not a PEM {what}; {self.fix(key)}", file=path)
        return data


def _is_certificates(data):
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        return False
    return True


def _is_private_key(data):
    try:
        serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _merge(files):
    """Merge kubeconfig files like kubectl: the first file to define a name wins.

    Returns ``{plural: {name: _Entry}}`` and the current-context.
    """
    merged = {plural: {} for plural, _ in _MAPS}
    current = None
    for path in files:
        document = _parse_document(_read_bytes(path, "check the kubeconfig's permissions"), path)
        for plural, singular in _MAPS:
            for name, body in _entries(document, plural, singular, path):
                merged[plural].setdefault(name, _Entry(singular, name, body, path))
        value = document.get("current-context")
        if value is not None and not isinstance(value, str):
            raise ConfigError("must be a context name", file=path, key="current-context")
        current = current or value
    return merged, current


def _from_kubeconfig(files, context, allow_plaintext):
    merged, current = _merge(files)
    where = os.pathsep.join(files)
    name = context or current
    if not name:
        raise ConfigError("no context given and no current-context set; name a context, or "
                          "set one with `kubectl config use-context NAME`", file=where)
    if name not in merged["contexts"]:
        known = ", ".join(sorted(merged["contexts"])) or "none"
        raise ConfigError(f"context {name!r} not found (contexts: {known}); use one of those",
                          file=where)
    chosen = merged["contexts"][name]
    cluster = _referenced(merged, chosen, "cluster", "clusters")
    if cluster is None:
        raise chosen.error("cluster", "is missing; name the cluster this context uses")
    user = _referenced(merged, chosen, "user", "users")
    return Upstream(
        **_cluster_settings(cluster, allow_plaintext),
        **({} if user is None else _user_settings(user)),
        namespace=chosen.string("namespace"),
        source=f"kubeconfig {where} context {name}",
    )


def _referenced(merged, context, key, plural):
    """The entry that ``context`` names under ``key``, or None when it names none."""
    name = context.string(key)
    if name is None:
        return None
    if name not in merged[plural]:
        raise context.error(key, f"{name!r} is not defined in any kubeconfig file; "
                            f"add the {key} or fix the name")
    return merged[plural][name]


def _cluster_settings(cluster, allow_plaintext):
    server = cluster.string("server")
    if server is None:
        raise cluster.error("server", "is missing; set it to the apiserver's https:// URL")
    host, port = _parse_server(server, allow_plaintext, cluster)
    if cluster.string("proxy-url"):
        raise cluster.error("proxy-url", "is not supported for the agent's upstream; "
                            "remove it and make the apiserver reachable directly")
    ca_pem = cluster.pem("certificate-authority", "certificate", _is_certificates)
    insecure = cluster.flag("insecure-skip-tls-verify")
    if insecure and ca_pem is not None:
        raise cluster.error("insecure-skip-tls-verify",
                            "cannot be combined with a certificate authority; remove one of them")
    return dict(server=server, host=host, port=port, ca_pem=ca_pem,
                tls_server_name=cluster.string("tls-server-name"),
                insecure_skip_tls_verify=insecure)


def _parse_server(server, allow_plaintext, cluster):
    """``(host, port)`` of a server URL; IPv6 hosts come without brackets."""
    try:
        url = urlsplit(server)
        port = url.port
        if port == 0:
            raise ValueError("port 0")
    except ValueError:
        raise cluster.error("server", "is not a valid URL; write it as https://HOST:PORT") from None
    if url.scheme == "http" and not allow_plaintext:
        raise cluster.error("server", "uses http://, but arc requires TLS to the apiserver; "
                            "use the apiserver's https:// URL")
    if url.scheme not in ("https", "http") or not url.hostname:
        raise cluster.error("server", "is not an https:// URL; write it as https://HOST:PORT")
    if port is None:
        port = 443 if url.scheme == "https" else 80
    return url.hostname, port


def _user_settings(user):
    for key, reason in _UNSUPPORTED_USER_FIELDS.items():
        if user.body.get(key):
            raise user.error(key, f"{reason}; {_CREDENTIALS_FIX}")
    cert = user.pem("client-certificate", "certificate", _is_certificates)
    key = user.pem("client-key", "private key (unencrypted)", _is_private_key)
    if (cert is None) != (key is None):
        missing = "client-key" if key is None else "client-certificate"
        raise user.error(missing, "is missing: a client certificate needs both "
                         "client-certificate and client-key; add the missing one")
    token = user.string("token")
    token_file = user.path_of("tokenFile")
    if token_file is not None and token is None:
        token = _read_token(token_file, user.fix("tokenFile"))
    return dict(client_cert_pem=cert, client_key_pem=key, token=token, token_file=token_file)


def _from_service_account(environ, root, looked_at):
    """The apiserver as seen from a pod: service host/port and the mounted account."""
    host = environ.get("KUBERNETES_SERVICE_HOST")
    port = environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError(
            f"no kubeconfig found (looked at {looked_at}) and not running in a pod "
            "(KUBERNETES_SERVICE_HOST or KUBERNETES_SERVICE_PORT is unset); set $KUBECONFIG or "
            "give the agent a kubeconfig path, or run the agent in the cluster"
        )
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError("must be a port number; fix the pod's environment",
                          key="KUBERNETES_SERVICE_PORT")
    fix = ("mount the service account into the pod (automountServiceAccountToken: true), "
           "or give the agent a kubeconfig")
    token_file = os.path.join(root, "token")
    token = _read_token(token_file, fix)
    ca_file = os.path.join(root, "ca.crt")
    ca_pem = _read_bytes(ca_file, fix)
    if not _is_certificates(ca_pem):
        raise ConfigError(f"not a PEM certificate; {fix}", file=ca_file)
    namespace_file = os.path.join(root, "namespace")
    namespace = None
    if os.path.exists(namespace_file):
        namespace = _read_bytes(namespace_file, fix).decode("utf-8", "replace").strip() or None
    server_host = f"[{host}]" if ":" in host else host
    return Upstream(server=f"https://{server_host}:{port}", host=host, port=int(port),
                    ca_pem=ca_pem, token=token, token_file=token_file, namespace=namespace,
                    source="in-cluster service account")


# Writing.


def default_kubeconfig_path(environ=None, home=None):
    """The kubeconfig to write: the first file in ``$KUBECONFIG``, else ``~/.kube/config``."""
    listed = _kubeconfig_paths(os.environ if environ is None else environ)
    return listed[0] if listed else _home_kubeconfig(home)


def merge_context(path, *, context, cluster_entry, user_entry, set_current=False,
                  owner_prefix="arc-"):
    """Add or update the context ``context`` in the kubeconfig at ``path``.

    Writes a cluster and a user named ``owner_prefix + context`` (their
    bodies are ``cluster_entry`` and ``user_entry``) and a context using
    them; an existing arc context keeps its other settings, such as its
    namespace. Everything else in the file is kept. The current-context
    changes only with ``set_current`` or when the file has none. Refuses,
    with :class:`ConfigError`, to replace a context arc did not write or to
    touch a file it cannot parse. Returns ``path``.
    """
    path = os.fspath(path)
    document, previous = _load_for_update(path)
    document.setdefault("apiVersion", "v1")
    document.setdefault("kind", "Config")
    owned = owner_prefix + context
    existing = _find(document, "contexts", "context", context, path)
    if existing is not None and not _is_owned(existing, owner_prefix):
        raise ConfigError(
            f"already exists and uses cluster {existing.get('cluster')!r}, which arc did not "
            "write; choose another context name for arc",
            file=path, key=f'context "{context}"')
    _put(document, "clusters", "cluster", owned, dict(cluster_entry), path)
    _put(document, "users", "user", owned, dict(user_entry), path)
    _put(document, "contexts", "context", context,
         {**(existing or {}), "cluster": owned, "user": owned}, path)
    if set_current or not document.get("current-context"):
        document["current-context"] = context
    _write_document(path, document, previous)
    return path


def remove_context(path, context, owner_prefix="arc-"):
    """Remove what :func:`merge_context` wrote for ``context``; returns ``path``.

    Refuses to remove a context arc did not write. Clears the current-context
    if it was ``context``. Leaves the file alone when there is nothing to
    remove.
    """
    path = os.fspath(path)
    document, previous = _load_for_update(path)
    existing = _find(document, "contexts", "context", context, path)
    if existing is not None and not _is_owned(existing, owner_prefix):
        raise ConfigError(
            f"uses cluster {existing.get('cluster')!r}, which arc did not write, so arc "
            f"leaves it alone; remove it with `kubectl config delete-context "
            f"{context}` if it is no longer needed", file=path, key=f'context "{context}"')
    owned = owner_prefix + context
    removed = [_drop(document, "contexts", "context", context, path),
               _drop(document, "clusters", "cluster", owned, path),
               _drop(document, "users", "user", owned, path)]
    if any(removed):
        if document.get("current-context") == context:
            document["current-context"] = ""
        _write_document(path, document, previous)
    return path


def _is_owned(context_body, owner_prefix):
    cluster = context_body.get("cluster")
    return isinstance(cluster, str) and cluster.startswith(owner_prefix)


def _load_for_update(path):
    """The document at ``path`` and its bytes; an empty document and None if missing."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}, None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}; check the file's permissions",
                          file=path) from None
    return _parse_document(raw, path), raw


def _find(document, plural, singular, name, path):
    """The body of the first entry called ``name`` in one named map, or None."""
    entries = _entries(document, plural, singular, path)
    return next((body for entry_name, body in entries if entry_name == name), None)


def _put(document, plural, singular, name, body, path):
    """Set the entry ``name`` of one named map, in place if it exists."""
    _entries(document, plural, singular, path)
    items = document.get(plural) or []
    document[plural] = items
    for item in items:
        if item["name"] == name:
            item[singular] = body
            return
    items.append({"name": name, singular: body})


def _drop(document, plural, singular, name, path):
    """Remove the entry ``name`` of one named map; True if there was one."""
    if _find(document, plural, singular, name, path) is None:
        return False
    document[plural] = [item for item in document[plural] if item["name"] != name]
    return True


def _write_document(path, document, previous):
    """Replace the kubeconfig atomically, first backing up ``previous`` to ``.arc.bak``.

    A symlinked kubeconfig stays a symlink: its target is replaced. A new
    file is private (0600), in a directory created private (0700); an
    existing file keeps its permissions.
    """
    target = os.path.realpath(path)
    text = yaml.safe_dump(document, default_flow_style=False, sort_keys=False,
                          allow_unicode=True)
    try:
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        mode = 0o600
        if previous is not None:
            mode = stat.S_IMODE(os.stat(target).st_mode)
            _replace_atomically(path + ".arc.bak", previous, 0o600)
        _replace_atomically(target, text.encode("utf-8"), mode)
    except OSError as e:
        raise ConfigError(f"cannot write: {e.strerror}; check the permissions of "
                          f"{os.path.dirname(target)}, or choose another kubeconfig file",
                          file=path) from None


def _replace_atomically(path, data, mode):
    """Write ``data`` to a temporary file beside ``path``, sync it, then rename it over."""
    write_private(path, data, mode)

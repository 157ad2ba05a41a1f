"""``arc cluster add|list|remove|rotate-token``: the relay's cluster registry.

Run on the relay's host against its configuration file.  ``add`` and
``rotate-token`` mint a random agent token, store only its SHA-256 in the
file and print the token once on standard output (everything else goes to
standard error), so it can be piped straight into the cluster::

    arc cluster add prod-eu --relay-config /etc/arc/relay.yaml --group platform \\
      | kubectl -n arc-system create secret generic arc-agent-token --from-file=token=/dev/stdin

Every change is checked with the relay's own loader before it replaces the
file; the replacement is atomic and the previous version is kept as
``FILE.bak``.  The file is rewritten from its parsed form, so its comments
are lost (they survive in the ``.bak`` of the first change).  A running
relay picks the change up within seconds (it polls the file) or at once on
SIGHUP.
"""

import contextlib
import fcntl
import os
import re
import secrets
import sys
import tempfile

import yaml

from arc import config
from arc.cli.main import CommandError
from arc.config import DNS_LABEL
from arc.errors import ConfigError
from arc.pki import write_private
from arc.relay.config import load_relay_config
from arc.relay.registry import parse_registry, token_digest

DEFAULT_CONFIG = "/etc/arc/relay.yaml"
HEADER = ("# arc relay configuration, rewritten by `arc cluster`: comments are not kept\n"
          "# (the previous version of this file is %s.bak).\n")
TOKEN_BYTES = 32
REGISTRY_KEYS = ("clusters", "users", "bindings")


# -- the command line -----------------------------------------------------------------


def add_arguments_cluster(parser):
    default = os.environ.get("ARC_RELAY_CONFIG", DEFAULT_CONFIG)
    sub = parser.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)
    common = dict(default=default, metavar="FILE",
                  help="the relay's configuration file (default: $ARC_RELAY_CONFIG or %s)"
                       % (DEFAULT_CONFIG,))
    rewrites = ("The file is rewritten from its parsed YAML: comments are lost (the previous "
                "version is kept as FILE.bak).")

    add = sub.add_parser(
        "add", help="register a cluster and print its new agent token once",
        description="Register a cluster at the relay and print its new agent token once on "
                    "standard output (only the token's SHA-256 is stored). " + rewrites)
    add.add_argument("name", metavar="NAME", help="cluster name (a DNS label)")
    add.add_argument("--relay-config", **common)
    add.add_argument("--group", action="append", default=[], metavar="G",
                     help="let members of group G reach the cluster (repeatable)")
    add.add_argument("--user", action="append", default=[], metavar="U",
                     help="let user U reach the cluster (repeatable)")

    listing = sub.add_parser("list", help="list registered clusters and who may reach them",
                             description="List registered clusters and their access bindings.")
    listing.add_argument("--relay-config", **common)

    remove = sub.add_parser("remove", help="unregister a cluster and its access bindings",
                            description="Unregister a cluster and drop its access bindings; "
                                        "the relay disconnects its agent. " + rewrites)
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--relay-config", **common)

    rotate = sub.add_parser(
        "rotate-token", help="replace a cluster's agent token and print the new one once",
        description="Replace a cluster's agent token and print the new one once on standard "
                    "output; the relay disconnects the agent still using the old token. "
                    + rewrites)
    rotate.add_argument("name", metavar="NAME")
    rotate.add_argument("--relay-config", **common)


def run_cluster(args):
    return {"add": add, "list": list_clusters, "remove": remove,
            "rotate-token": rotate_token}[args.cluster_command](args)


# -- subcommands ------------------------------------------------------------------------


def add(args):
    name = _check_name(args.name)
    path = args.relay_config
    with _locked(path):
        _, baseline = _load_current(path)
        data = _read(path)
        clusters = _mapping(data, "clusters", path)
        if name in clusters:
            raise CommandError("cluster %r is already registered in %s; run `arc cluster "
                               "rotate-token %s` for a new token, or `arc cluster remove %s` "
                               "first" % (name, path, name, name))
        token = new_token()
        clusters[name] = {"agent_token_sha256": token_digest(token)}
        if args.group or args.user:
            binding = {"cluster": name}
            if args.user:
                binding["users"] = _unique(args.user)
            if args.group:
                binding["groups"] = _unique(args.group)
            _bindings(data, path).append(binding)
        _replace(path, data, baseline)
    print(token)
    _note("registered cluster %s in %s (previous version: %s.bak)%s"
          % (name, path, path, _who(args.user, args.group)))
    _note("the token above is shown only once: store it in the cluster, e.g. `kubectl -n "
          "arc-system create secret generic arc-agent-token --from-file=token=/dev/stdin`, "
          "then apply `arc agent manifest %s --relay-url URL`" % (name,))
    _note_reload()


def list_clusters(args):
    path = args.relay_config
    registry, _ = _load_current(path)
    rows = [("CLUSTER", "USERS", "GROUPS")]
    for name in sorted(registry.clusters):
        binding = registry.bindings.get(name)
        users = ",".join(sorted(binding.users)) if binding else ""
        groups = ",".join(sorted(binding.groups)) if binding else ""
        rows.append((name, users or "-", groups or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for row in rows:
        print("%-*s  %-*s  %s" % (widths[0], row[0], widths[1], row[1], row[2]))
    if len(rows) == 1:
        _note("no cluster is registered in %s; add one with `arc cluster add NAME`" % (path,))


def remove(args):
    path = args.relay_config
    with _locked(path):
        _, baseline = _load_current(path)
        data = _read(path)
        clusters = _mapping(data, "clusters", path)
        _known(args.name, clusters, path)
        del clusters[args.name]
        bindings = _bindings(data, path)
        kept = [b for b in bindings if not (isinstance(b, dict) and b.get("cluster") == args.name)]
        dropped = len(bindings) - len(kept)
        bindings[:] = kept
        if not bindings:
            data.pop("bindings", None)
        _replace(path, data, baseline)
    _note("removed cluster %s and %d access binding%s from %s (previous version: %s.bak)"
          % (args.name, dropped, "" if dropped == 1 else "s", path, path))
    _note_reload("its agent is disconnected")


def rotate_token(args):
    path = args.relay_config
    with _locked(path):
        _, baseline = _load_current(path)
        data = _read(path)
        clusters = _mapping(data, "clusters", path)
        _known(args.name, clusters, path)
        token = new_token()
        clusters[args.name]["agent_token_sha256"] = token_digest(token)
        _replace(path, data, baseline)
    print(token)
    _note("new agent token for cluster %s stored in %s (previous version: %s.bak); the old "
          "token no longer works" % (args.name, path, path))
    _note("replace the cluster's Secret with it, e.g. `kubectl -n arc-system create secret "
          "generic arc-agent-token --from-file=token=/dev/stdin --dry-run=client -o yaml | "
          "kubectl apply -f -`; the agent reads it at its next connection attempt")
    _note_reload("the agent using the old token is disconnected")


def new_token():
    """A fresh agent token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(TOKEN_BYTES)


# -- reading, checking and replacing the file -------------------------------------------


def _note(text):
    print(text, file=sys.stderr)


def _note_reload(what=None):
    text = "a running relay applies the change within seconds (or at once on SIGHUP)"
    if what:
        text += "; " + what
    _note(text)


def _who(users, groups):
    names = ["user " + u for u in _unique(users)] + ["group " + g for g in _unique(groups)]
    if not names:
        return "; nobody may reach it yet (add a binding under bindings:)"
    return "; reachable by " + ", ".join(names)


def _unique(values):
    return list(dict.fromkeys(values))


def _check_name(name):
    if not DNS_LABEL.match(name):
        raise CommandError("cluster name %r must be a DNS label: lower-case letters, digits and "
                           "'-', at most 63 characters, starting and ending with a letter or "
                           "digit" % (name,))
    return name


def _known(name, clusters, path):
    if name not in clusters:
        known = ", ".join(sorted(map(str, clusters))) or "none"
        raise CommandError("cluster %r is not registered in %s (registered: %s); check the "
                           "name with `arc cluster list`" % (name, path, known))


def _read(path):
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise _unreadable(path, e) from None
    except yaml.YAMLError as e:
        raise CommandError("%s is not valid YAML (%s); fix it first" % (path, e)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CommandError("%s: the top level must be a mapping of keys to values; fix it "
                           "first" % (path,))
    return data


def _unreadable(path, error):
    if isinstance(error, FileNotFoundError):
        return CommandError("%s does not exist; give the relay's configuration with "
                            "--relay-config (etc/relay.yaml is a commented example)" % (path,))
    return CommandError("cannot read %s: %s; run as the relay's user or fix the file's "
                        "permissions" % (path, error.strerror))


def _registry_key(key):
    return bool(key) and re.split(r"[.\[]", key, 1)[0] in REGISTRY_KEYS


def _load_current(path):
    """The registry of ``path`` as the relay loads it, and the problem tolerated, if any.

    A file the relay would refuse is not edited, with one exception: a
    problem outside the registry, such as a TLS file that exists only on
    the relay's host (a configuration kept beside Kubernetes manifests).
    Then the registry alone is checked, and a change is accepted only if the
    whole file fails the same way as before (see :func:`_replace`).
    """
    if not os.path.exists(path):
        raise _unreadable(path, FileNotFoundError())
    try:
        return load_relay_config(path).registry, None
    except ConfigError as e:
        if not _registry_key(e.key):
            if not e.key:
                raise CommandError("%s; fix it first (see etc/relay.yaml)" % (e,)) from None
            _note("note: %s does not load completely on this machine (%s: %s); checking "
                  "clusters, users and bindings only" % (path, e.key, e.reason))
            return _registry_only(path, path), e
        raise CommandError("%s; the relay would refuse this file as it is: fix it first (see "
                           "etc/relay.yaml)" % (e,)) from None


def _registry_only(path, shown):
    try:
        return parse_registry(config.load(path))
    except ConfigError as e:
        where = ": ".join(str(part) for part in (shown, e.key) if part)
        raise CommandError("%s: %s; fix it first (see etc/relay.yaml)" % (where, e.reason)) \
            from None


def _mapping(data, key, path):
    value = data.get(key)
    if value is None:
        value = data[key] = {}
    if not isinstance(value, dict):
        raise CommandError("%s: %s must be a mapping of names to entries; fix it first"
                           % (path, key))
    return value


def _bindings(data, path):
    value = data.get("bindings")
    if value is None:
        value = data["bindings"] = []
    if not isinstance(value, list):
        raise CommandError("%s: bindings must be a list; fix it first" % (path,))
    return value


@contextlib.contextmanager
def _locked(path):
    """Hold an exclusive lock on ``path`` so concurrent changes do not lose each other.

    The lock is on the file itself; since a change replaces the file, a
    waiter that wakes up holding the lock of a replaced inode tries again.
    """
    while True:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise _unreadable(path, e) from None
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(f.fileno()).st_ino:
                yield
                return


def _replace(path, data, baseline=None):
    """Write ``data`` to ``path`` atomically, after the relay's loader accepted it.

    The candidate is written beside the file (so relative paths in it mean
    the same), loaded with :func:`load_relay_config`, then the current file
    is copied to ``path.bak`` and the candidate renamed over it, keeping the
    file's mode (and owner, when allowed).  ``baseline`` is the problem the
    current file already had outside the registry (see
    :func:`_load_current`): the candidate may fail with exactly that one.
    """
    path = os.path.abspath(path)
    directory, base = os.path.split(path)
    st = os.stat(path)
    text = HEADER % (base,) + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + base + ".", suffix=".tmp")
    try:
        os.fchmod(fd, st.st_mode & 0o7777)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            load_relay_config(tmp)
        except ConfigError as e:
            if baseline is None or (e.key, e.reason) != (baseline.key, baseline.reason):
                where = ": ".join(str(part) for part in (path, e.key) if part)
                raise CommandError("the change would make the relay refuse its configuration "
                                   "(%s: %s); %s is unchanged" % (where, e.reason, path)) \
                    from None
            _registry_only(tmp, path)
        _chown_like(tmp, st)
        _backup(path, st)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _backup(path, st):
    """Copy ``path`` to ``path.bak`` atomically, with the same mode."""
    with open(path, "rb") as f:
        original = f.read()
    backup = path + ".bak"
    write_private(backup, original, st.st_mode & 0o7777)
    _chown_like(backup, st)


def _chown_like(path, st):
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(path, st.st_uid, st.st_gid)

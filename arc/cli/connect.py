"""``arc connect``, ``arc disconnect``, ``arc status``, ``arc proxy``.

One client daemon per user serves every connected cluster.  ``arc
connect`` records the cluster in the daemon's configuration
(``~/.config/arc/client.yaml``), starts the daemon if none runs (else asks
it to reload), waits until its tunnel to the relay is up, and leaves a
kubeconfig context named after the cluster whose user is an exec
credential plugin (``arc token``).  ``arc disconnect`` removes a cluster;
the last one stops the daemon, so a CI job leaves no process behind.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import yaml

from arc.cli.main import CommandError
from arc.cli.paths import DaemonPaths
from arc.kube.kubeconfig import default_kubeconfig_path, remove_context
from arc.pki import write_private


# -- the control socket -------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=5):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _control(paths, method="GET", what="status"):
    conn = _UnixHTTPConnection(paths.control)
    try:
        conn.request(method, "/" + what)
        response = conn.getresponse()
        return json.loads(response.read())
    finally:
        conn.close()


def daemon_status(paths):
    """The running daemon's status, or None when none answers."""
    try:
        return _control(paths)
    except (OSError, ValueError, http.client.HTTPException):
        return None


def _daemon_pid(paths):
    try:
        with open(paths.pid) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


# -- configuration -------------------------------------------------------------------


def _load(paths):
    if not os.path.exists(paths.config):
        return None
    with open(paths.config) as f:
        return yaml.safe_load(f) or {}


def _save(paths, data):
    text = "# Managed by `arc connect` / `arc disconnect`.\n" + yaml.safe_dump(data, sort_keys=False)
    write_private(paths.config, text.encode("utf-8"))


def _arc_command():
    """``(command, leading args)`` that run this arc for kubectl's exec plugin."""
    script = os.path.join(os.path.dirname(sys.executable), "arc")
    if os.path.exists(script):
        return script, []
    found = shutil.which("arc")
    if found:
        return os.path.abspath(found), []
    return sys.executable, ["-m", "arc.cli.main"]


def _credential(args):
    """``(relay credential keys, arc token arguments)`` from the flags."""
    if args.token_file:
        path = os.path.abspath(args.token_file)
        if not os.path.exists(path):
            raise CommandError("token file %s does not exist" % (path,))
        return {"token_file": path}, ["token", "--from-file", path]
    if args.token_command:
        return {"token_command": args.token_command}, ["token", "--from-command",
                                                       args.token_command]
    if args.token_env:
        if args.token_env not in os.environ:
            raise CommandError("environment variable %s is not set (it must hold the token)"
                               % (args.token_env,))
        return {"token_env": args.token_env}, ["token", "--from-env", args.token_env]
    from arc.cli import tokencache
    cache = tokencache.cache_path(args.profile)
    if not os.path.exists(cache):
        raise CommandError("not logged in: run \"arc login --profile %s\" first, or give "
                           "--token-file/--token-env" % (args.profile,))
    return {"token_cache": cache}, ["token", "--profile", args.profile]


def add_arguments_connect(parser):
    parser.add_argument("cluster", help="the cluster's name at the relay")
    parser.add_argument("--relay", help="relay URL, e.g. https://relay.example.com "
                                        "(needed on the first connect)")
    parser.add_argument("--ca-file", help="CA bundle for the relay's certificate")
    parser.add_argument("--transport", choices=["tunnel", "websocket"])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--token-file", help="read the user token from this file (CI)")
    group.add_argument("--token-env", help="read the user token from this environment "
                                           "variable (CI)")
    group.add_argument("--token-command", help="run this command for the user token (CI); "
                                               "it prints the token or an ExecCredential")
    group.add_argument("--profile", default="default", help="login profile (arc login)")
    parser.add_argument("--kube-token-file", help="a different token for kubectl to present "
                                                  "to the cluster (passthrough setups)")
    parser.add_argument("--kube-context", help="context name (default: the cluster name)")
    parser.add_argument("-f", "--kubeconfig", help="kubeconfig to merge into (default: "
                                                   "$KUBECONFIG or ~/.kube/config); '-' prints "
                                                   "a kubeconfig for the cluster instead")
    parser.add_argument("--listen", help="local listener of the daemon (first connect only; "
                                         "default tcp:47011:interface=127.0.0.1)")
    parser.add_argument("--set-current", action="store_true",
                        help="also make it the current context")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds to wait for the tunnel (default 20)")


def run_connect(args):
    paths = DaemonPaths()
    data = _load(paths) or {}
    relay = dict(data.get("relay") or {})
    if args.relay:
        relay["url"] = args.relay
    if not relay.get("url"):
        raise CommandError("no relay known yet: give --relay https://RELAY")
    if args.ca_file:
        relay["ca_file"] = os.path.abspath(args.ca_file)
    if args.transport:
        relay["transport"] = args.transport
    keys, token_args = _credential(args)
    for key in ("token_file", "token_env", "token_cache", "token_command"):
        relay.pop(key, None)
    relay.update(keys)
    printing = args.kubeconfig == "-"
    if not printing:
        kubeconfig = os.path.abspath(args.kubeconfig) if args.kubeconfig \
            else data.get("kubeconfig") or default_kubeconfig_path()
        if data.get("kubeconfig") and data["kubeconfig"] != kubeconfig and data.get("clusters"):
            raise CommandError("the daemon already writes %s; use that (or disconnect all "
                               "clusters first)" % (data["kubeconfig"],))
        data["kubeconfig"] = kubeconfig
    entry = {"name": args.cluster, "context": args.kube_context or args.cluster}
    if args.kube_token_file:
        entry["token_file"] = os.path.abspath(args.kube_token_file)
    else:
        command, lead = _arc_command()
        entry["kubeconfig_user"] = {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": command,
            "args": lead + token_args,
            "interactiveMode": "IfAvailable",
            "provideClusterInfo": False,
        }}
    if printing:
        entry["write_kubeconfig"] = False
    clusters = [c for c in data.get("clusters") or [] if c.get("name") != args.cluster]
    clusters.append(entry)
    data.update(relay=relay, clusters=clusters, control="unix:" + paths.control,
                state_dir=paths.state)
    if args.listen:
        data["listen"] = args.listen
    data.setdefault("listen", "tcp:47011:interface=127.0.0.1")
    data["set_current_context"] = bool(args.set_current)
    _check(paths, data)
    _save(paths, data)
    status = _ensure_daemon(paths, args.timeout)
    if printing:
        sys.stdout.write(_standalone_kubeconfig(paths, status, entry))
        return 0
    print("cluster %s: context %r in %s via %s (tunnel %s)" % (
        args.cluster, entry["context"], data["kubeconfig"],
        _server_of(status, args.cluster), status["tunnel"]), file=sys.stderr)
    return 0


def _check(paths, data):
    """Validate the configuration the daemon will load, before replacing the file."""
    from arc.client.config import load_client_config
    tmp = paths.config + ".check"
    write_private(tmp, yaml.safe_dump(data).encode())
    try:
        load_client_config(tmp)
    finally:
        os.unlink(tmp)


def _server_of(status, cluster):
    for entry in status.get("clusters", []):
        if entry["name"] == cluster:
            return entry.get("server")
    return None


def _ensure_daemon(paths, timeout):
    status = daemon_status(paths)
    if status is not None:
        status = _control(paths, "POST", "reload")
    else:
        _start_daemon(paths)
    deadline = time.monotonic() + timeout
    while True:
        status = daemon_status(paths)
        if status is not None and status["tunnel"] == "up" and all(
                c.get("server") for c in status["clusters"]):
            return status
        if time.monotonic() > deadline:
            problem = (status or {}).get("last_error") or "no answer from the daemon"
            raise CommandError("the tunnel to the relay is not up after %.0f s: %s (log: %s)"
                               % (timeout, problem, paths.log))
        if status is None and _daemon_pid(paths) is None and os.path.exists(paths.log) \
                and time.monotonic() > deadline - timeout + 3:
            raise CommandError("the client daemon did not start; its log %s ends with: %s"
                               % (paths.log, _tail(paths.log)))
        time.sleep(0.1)


def _tail(path, lines=3):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start_daemon(paths):
    os.makedirs(paths.base, mode=0o700, exist_ok=True)
    if os.path.exists(paths.control):
        os.unlink(paths.control)   # left by a daemon that died
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--pidfile", paths.pid, "--logfile", paths.log, "--umask", "0077",
            "arc-client", "--config", paths.config]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise CommandError("the client daemon did not start: %s" % (_failure_line(paths, result),))


def _failure_line(paths, result):
    """The line that says why twistd failed: its output, else the end of its log."""
    lines = (result.stderr or result.stdout).strip().splitlines()
    try:
        with open(paths.log, errors="replace") as f:
            lines += [line.split("] ", 1)[-1] for line in f.read().splitlines()[-40:]]
    except OSError:
        pass
    text = "\n".join(lines)
    if "Errno 98" in text or "already in use" in text:
        where = re.search(r"listen on ([^\s:]+:\d+)", text)
        return ("the local port %sis already in use: another process holds it (give --listen "
                "tcp:PORT:interface=127.0.0.1 on the first connect)"
                % (where.group(1) + " " if where else ""))
    for line in reversed(lines):
        if "Error" in line and ":" in line:
            return line.strip()
    return lines[-1] if lines else "no output"


def _standalone_kubeconfig(paths, status, entry):
    from arc.client.localca import ensure_local_ca
    import base64
    ca = ensure_local_ca(paths.state)
    name = entry["context"]
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": "arc-" + name, "cluster": {
            "server": _server_of(status, entry["name"]),
            "certificate-authority-data": base64.b64encode(ca.ca_cert_pem).decode(),
            "tls-server-name": ca.server_name(entry["name"])}}],
        "users": [{"name": "arc-" + name, "user": entry.get("kubeconfig_user") or {
            "tokenFile": entry.get("token_file")}}],
        "contexts": [{"name": name, "context": {"cluster": "arc-" + name,
                                                "user": "arc-" + name}}],
    }
    return yaml.safe_dump(doc, sort_keys=False)


# -- disconnect, status, proxy ----------------------------------------------------------------


def add_arguments_disconnect(parser):
    parser.add_argument("cluster", nargs="?", help="the cluster to stop serving")
    parser.add_argument("--all", action="store_true", help="every cluster; stops the daemon")


def run_disconnect(args):
    paths = DaemonPaths()
    data = _load(paths)
    if not data or not data.get("clusters"):
        stopped = stop_daemon(paths)
        print("no cluster is connected%s" % ("; stopped the daemon" if stopped else ""),
              file=sys.stderr)
        return 0
    if not args.all and not args.cluster:
        raise CommandError("name a cluster, or give --all")
    names = {c["name"] for c in data["clusters"]}
    if args.cluster and args.cluster not in names:
        raise CommandError("cluster %r is not connected (connected: %s)"
                           % (args.cluster, ", ".join(sorted(names))))
    gone = [c for c in data["clusters"] if args.all or c["name"] == args.cluster]
    data["clusters"] = [c for c in data["clusters"] if c not in gone]
    for entry in gone:
        if entry.get("write_kubeconfig", True) and data.get("kubeconfig"):
            remove_context(data["kubeconfig"], entry.get("context", entry["name"]))
    if data["clusters"]:
        _save(paths, data)
        if daemon_status(paths) is not None:
            _control(paths, "POST", "reload")
    else:
        data.pop("clusters")
        _save_stopped(paths, data)
        stop_daemon(paths)
    print("disconnected %s" % ", ".join(c["name"] for c in gone), file=sys.stderr)
    return 0


def _save_stopped(paths, data):
    """Keep the relay settings for the next connect; no cluster means no daemon."""
    text = "# Managed by `arc connect` / `arc disconnect`.\n" + yaml.safe_dump(
        dict(data, clusters=[]), sort_keys=False)
    write_private(paths.config, text.encode("utf-8"))


def stop_daemon(paths, timeout=15):
    pid = _daemon_pid(paths)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True


def add_arguments_status(parser):
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def run_status(args):
    paths = DaemonPaths()
    status = daemon_status(paths)
    if status is None:
        raise CommandError("no arc client daemon is running: \"arc connect CLUSTER\" starts one")
    if args.output == "json":
        print(json.dumps(status, indent=2))
        return 0 if status["tunnel"] == "up" else 1
    problem = "" if status["tunnel"] == "up" else " (%s)" % (status.get("last_error") or "")
    print("relay %s: tunnel %s%s; daemon pid %s; kubeconfig %s" % (
        status["relay"], status["tunnel"], problem, status["pid"], status["kubeconfig"]))
    print("%-24s %-24s %s" % ("CLUSTER", "CONTEXT", "SERVER"))
    for entry in status["clusters"]:
        print("%-24s %-24s %s" % (entry["name"], entry["context"], entry["server"] or "-"))
    return 0 if status["tunnel"] == "up" else 1


def add_arguments_proxy(parser):
    parser.add_argument("--stop", action="store_true", help="stop the background daemon")


def run_proxy(args):
    paths = DaemonPaths()
    if args.stop:
        print("stopped" if stop_daemon(paths) else "no daemon was running", file=sys.stderr)
        return 0
    if not os.path.exists(paths.config):
        raise CommandError("nothing to serve yet: \"arc connect CLUSTER --relay URL\" first")
    if daemon_status(paths) is not None:
        raise CommandError("a client daemon is already running (arc proxy --stop stops it)")
    os.execv(sys.executable, [sys.executable, "-c",
                              "from twisted.scripts.twistd import run; run()", "-n",
                              "--pidfile", paths.pid, "arc-client", "--config", paths.config])

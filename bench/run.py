#!/usr/bin/env python3
"""Compare arc with a direct connection and with ``ssh -R``, all on loopback.

One run starts an nginx backend over TLS (a stand-in for kube-apiserver),
reaches it several ways, and measures the same workloads through each:

    direct      https://127.0.0.1:NGINX_PORT
    ssh-R       sshd + ``ssh -N -R`` forwarding a loopback port to nginx (TLS end to end)
    arc-splice  arc-client -> arc-relay -> arc-agent -> nginx, the agent's guard disabled
                (``guard: {enabled: false}``: raw byte splice, no HTTP parsing)
    arc         the same with the default agent configuration: the guard parses every
                request and passes the caller's token through
    arc-static  the guard impersonating: it checks a static bearer token, then sends its
                own token (from the upstream kubeconfig) with Impersonate-* headers
    arc-oidc    the same with an OIDC ID token checked against a local issuer
    arc-ws      ``arc`` with the websocket transport

Workloads: small GETs (wrk, 1 and 64 connections), a bulk download (curl),
head-of-line blocking (small GETs while a large download runs on the same path),
connection set-up (new TLS connection to first response byte), and the CPU time
spent by the processes on each path.  Prints a table of
medians and what the guard costs per request (against arc-splice), and
writes every sample to a JSON file and the tables to a Markdown file.

    python bench/run.py [--quick] [--repeat N] [--duration S] [--targets LIST] [--out FILE]

See bench/README.md for what the figures mean.
"""

import argparse
import base64
import datetime
import hashlib
import json
import math
import os
import platform
import pwd
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import ssl
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

try:
    import arc  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # running from a checkout without PYTHONPATH
    sys.path.insert(0, REPO)
    import arc  # noqa: F401
import yaml  # noqa: E402  (a dependency of arc)

from arc import demo, pki  # noqa: E402

PODS_PATH = "/api/v1/namespaces/default/pods"
BULK_PATH = "/bulk"
HOL_PATH = "/hol"     # the large file downloaded during the head-of-line workload
IDENTITY_PATH = "/bench/identity"  # nginx answers with the identity headers it received
API_TOKEN = "bench-token-not-checked-by-nginx"   # what callers send when no guard checks it
GUARD_TOKEN = "bench-guard-token-not-checked-by-nginx"  # the guard's own credential (impersonation)
BENCH_USER = "bench"    # the user arc-static and arc-oidc callers authenticate as
OIDC_CLIENT_ID = "arc"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# command -> Debian package that provides it
TOOLS = [
    ("nginx", "nginx"),
    ("sshd", "openssh-server"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("wrk", "wrk"),
    ("curl", "curl"),
]

TARGET_TITLES = {
    "direct": "direct",
    "ssh": "ssh -R",
    "arc-splice": "arc-splice",
    "arc": "arc",
    "arc-static": "arc-static",
    "arc-oidc": "arc-oidc",
    "arc-ws": "arc-ws",
}

# arc targets: name -> (transport, guard mode).  Guard modes: "splice" (guard disabled),
# "passthrough" (no guard: section, the default), "static" and "oidc" (impersonation).
ARC_TARGETS = {
    "arc-splice": ("tunnel", "splice"),
    "arc": ("tunnel", "passthrough"),
    "arc-static": ("tunnel", "static"),
    "arc-oidc": ("tunnel", "oidc"),
    "arc-ws": ("websocket", "passthrough"),
}
# what each guard-on target is compared with to get the guard's cost
GUARD_BASELINE = "arc-splice"
GUARD_COMPARED = ("arc", "arc-static", "arc-oidc")


class BenchError(Exception):
    pass


class Stop(BaseException):
    """Raised from the SIGTERM/SIGHUP handler so that clean-up runs."""


def log(msg):
    print("[bench] " + msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools

def find_tool(name):
    path = shutil.which(name)
    if path:
        return path
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"):
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_tools(allow_install):
    missing = sorted({pkg for name, pkg in TOOLS if find_tool(name) is None})
    if missing:
        if not allow_install:
            raise BenchError("missing packages: %s (run without --no-install, or install them)"
                             % " ".join(missing))
        if os.geteuid() != 0:
            raise BenchError("missing packages: %s; install them as root "
                             "(apt-get install -y %s)" % (" ".join(missing), " ".join(missing)))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends"] + missing
        print("installing: %s  (%s)" % (" ".join(missing), " ".join(cmd)), flush=True)
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=900)
        if r.returncode != 0:
            log("apt-get install failed; running apt-get update and trying again")
            subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=600)
            r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=900)
        if r.returncode != 0:
            raise BenchError("apt-get install failed:\n" + r.stdout[-3000:])
        print("installed: %s" % " ".join(missing), flush=True)
    tools = {}
    for name, pkg in TOOLS:
        path = find_tool(name)
        if path is None:
            raise BenchError("%s not found after installing %s" % (name, pkg))
        tools[name] = path
    return tools


def tool_versions(tools):
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=10)
            return (r.stdout.strip().splitlines() or [""])[0]
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    return {
        "nginx": first_line([tools["nginx"], "-v"]),
        "ssh": first_line([tools["ssh"], "-V"]),
        "wrk": first_line([tools["wrk"], "-v"]),
        "curl": first_line([tools["curl"], "--version"]),
        "arc": getattr(arc, "__version__", "?"),
        "arc_path": os.path.dirname(os.path.dirname(os.path.abspath(arc.__file__))),
    }


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def repo_commit():
    """The short commit of this checkout; "+changes" when arc is imported from this checkout
    and its own files differ from that commit."""
    def git(*args):
        try:
            r = subprocess.run(["git", "-C", REPO] + list(args), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "?"
    arc_root = os.path.dirname(os.path.dirname(os.path.abspath(arc.__file__)))
    if os.path.realpath(arc_root) != os.path.realpath(REPO):
        return head  # arc is an installed copy: the checkout's local edits do not apply
    changed = git("status", "--porcelain", "--", "arc", "twisted", ":!arc/testing")
    return head + ("+changes" if changed else "")


def machine_info():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "loadavg": loadavg(),
        "commit": repo_commit(),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- processes

def free_ports(n):
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def read_stat(pid):
    """(ppid, utime+stime+cutime+cstime in ticks) of pid, or None if gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): ppid=4, utime=14, stime=15, cutime=16, cstime=17
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ppid, ticks


def all_parents():
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                parents[int(entry)] = st[0]
    return parents


def tree(roots):
    """roots and all their live descendants."""
    parents = all_parents()
    children = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = [], [r for r in roots if r in parents]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, ()))
    return seen


def cpu_seconds(roots):
    """CPU seconds (user+system, including reaped children) of roots' process trees."""
    total = 0
    for pid in tree(roots):
        st = read_stat(pid)
        if st is not None:
            total += st[1]
    return total / CLK_TCK


def peak_rss_mib(roots):
    total = 0
    for pid in tree(roots):
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024.0


def proc_name(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


class Processes:
    """Every process the benchmark starts, so that all of them are stopped."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.started = []   # (name, Popen, logpath)
        self.extra = []     # (name, pid): processes not started by us directly (sshd children)

    def start(self, name, argv, cwd=None, env=None):
        path = os.path.join(self.logdir, name + ".log")
        out = open(path, "ab")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                 start_new_session=True)
        finally:
            out.close()
        self.started.append((name, p, path))
        return p

    def check(self, names):
        for name, p, path in self.started:
            if name in names and p.poll() is not None:
                raise BenchError("%s exited with status %s; last lines of %s:\n%s"
                                 % (name, p.returncode, path, tail(path)))

    def stop_all(self):
        # Newest first: clients before servers, so connections close cleanly.
        for name, p, _ in reversed(self.started):
            if p.poll() is None:
                descendants = [pid for pid in tree([p.pid]) if pid != p.pid]
                self._signal(p.pid, signal.SIGTERM, group=True)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._signal(p.pid, signal.SIGKILL, group=True)
                    p.wait(timeout=5)
                for pid in descendants:
                    self.extra.append((name + " child", pid))
        deadline = time.monotonic() + 5
        for name, pid in self.extra:
            while read_stat(pid) is not None and time.monotonic() < deadline:
                self._signal(pid, signal.SIGTERM)
                time.sleep(0.1)
            if read_stat(pid) is not None:
                self._signal(pid, signal.SIGKILL)
        self.started = []
        self.extra = []

    @staticmethod
    def _signal(pid, sig, group=False):
        try:
            if group:
                os.killpg(pid, sig)  # each process was started in its own session
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def wait_port(port, timeout, what, procs=None, names=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check(names)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchError("%s did not listen on 127.0.0.1:%d within %d s" % (what, port, timeout))


def curl_status(tools, url, extra=(), timeout=5):
    cmd = [tools["curl"], "-sS", "-k", "-o", "/dev/null", "-w", "%{http_code}",
           "--max-time", str(timeout)] + list(extra) + [url]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return "timeout"
    return r.stdout.strip() or r.stderr.strip()


def curl_body(tools, url, extra=(), timeout=5):
    """(status, body) of one GET, or (error text, None)."""
    cmd = [tools["curl"], "-sS", "-k", "--max-time", str(timeout), "-w", "\n%{http_code}"]
    try:
        r = subprocess.run(cmd + list(extra) + [url], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return "timeout", None
    if r.returncode != 0:
        return r.stderr.strip() or "curl exit %d" % r.returncode, None
    body, _, status = r.stdout.rpartition("\n")
    return status, body


def wait_http(tools, url, timeout, what, extra=(), procs=None, names=()):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check(names)
        last = curl_status(tools, url, extra, timeout=3)
        if last == "200":
            return
        time.sleep(0.3)
    raise BenchError("%s did not answer 200 on %s within %d s (last: %s)"
                     % (what, url, timeout, last))


# --------------------------------------------------------------------------- backend

def pods_json():
    items = []
    for i in range(3):
        items.append({
            "metadata": {"name": "web-%d" % i, "namespace": "default",
                         "uid": "00000000-0000-4000-8000-00000000000%d" % i,
                         "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "nginx:1.25"}],
                     "nodeName": "node-1"},
            "status": {"phase": "Running", "podIP": "10.0.0.%d" % (10 + i)},
        })
    doc = {"kind": "PodList", "apiVersion": "v1",
           "metadata": {"resourceVersion": "12345"}, "items": items}
    body = json.dumps(doc, indent=1)
    # pad to about 1 KiB with a harmless annotation on the last pod
    missing = 1024 - len(body) - len(', "annotations": {"pad": ""}')
    if missing > 0:
        items[-1]["metadata"]["annotations"] = {"pad": "x" * missing}
        body = json.dumps(doc, indent=1)
    return body.encode() + b"\n"


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {prefix}/server.crt;
        ssl_certificate_key {prefix}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        root {prefix}/www;
        location = {pods} {{ default_type application/json; }}
        location = {bulk} {{ default_type application/octet-stream; }}
        location = {hol} {{ default_type application/octet-stream; }}
        location = {identity} {{
            default_type text/plain;
            return 200 "$http_authorization|$http_impersonate_user|$http_impersonate_group";
        }}
        location / {{ return 404; }}
    }}
}}
"""


def start_nginx(tools, procs, base, port, ca, ca_key, bulk_bytes, hol_bytes=0):
    prefix = os.path.join(base, "nginx")
    for d in ("tmp", "www" + os.path.dirname(PODS_PATH)):
        os.makedirs(os.path.join(prefix, d), exist_ok=True)
    cert, key = pki.issue(ca, ca_key, "bench-nginx", dns_names=["localhost"], ips=["127.0.0.1"])
    pki.write_private(os.path.join(prefix, "server.crt"), cert, 0o644)
    pki.write_private(os.path.join(prefix, "server.key"), key)
    with open(os.path.join(prefix, "www" + PODS_PATH), "wb") as f:
        f.write(pods_json())
    for path, size in ((BULK_PATH, bulk_bytes), (HOL_PATH, hol_bytes)):
        big = os.path.join(prefix, "www" + path)
        with open(big, "wb") as f:
            f.truncate(size)  # sparse: zeros from the page cache
        with open(big, "rb") as f:  # read it once so that no target pays for filling the cache
            while f.read(1 << 20):
                pass
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(user="user root;\n" if os.geteuid() == 0 else "",
                                  prefix=prefix, port=port, pods=PODS_PATH, bulk=BULK_PATH,
                                  hol=HOL_PATH,
                                  identity=IDENTITY_PATH))
    r = subprocess.run([tools["nginx"], "-t", "-p", prefix, "-c", conf, "-e",
                        os.path.join(prefix, "error.log")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    if r.returncode != 0:
        raise BenchError("nginx -t failed:\n" + r.stdout)
    p = procs.start("nginx", [tools["nginx"], "-p", prefix, "-c", conf,
                              "-e", os.path.join(prefix, "error.log")])
    url = "https://127.0.0.1:%d" % port
    wait_http(tools, url + PODS_PATH, 15, "nginx", procs=procs, names=("nginx",))
    return p, url


# --------------------------------------------------------------------------- ssh -R

SSHD_CONF = """\
ListenAddress 127.0.0.1:{port}
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
AllowUsers {user}
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
UseDNS no
LogLevel INFO
"""


def ssh_client_args(tools, d, sshd_port, user):
    return [tools["ssh"], "-F", "/dev/null", "-i", os.path.join(d, "id_ed25519"),
            "-p", str(sshd_port),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=10"], "%s@127.0.0.1" % user


def start_ssh(tools, procs, base, nginx_port, sshd_port, fwd_port):
    d = os.path.join(base, "ssh")
    os.makedirs(d, mode=0o700, exist_ok=True)
    user = pwd.getpwuid(os.geteuid()).pw_name
    for name in ("ssh_host_ed25519_key", "id_ed25519"):
        subprocess.run([tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-C", "arc-bench",
                        "-f", os.path.join(d, name)], check=True, timeout=30,
                       stdout=subprocess.DEVNULL)
    shutil.copyfile(os.path.join(d, "id_ed25519.pub"), os.path.join(d, "authorized_keys"))
    conf = os.path.join(d, "sshd_config")
    with open(conf, "w") as f:
        f.write(SSHD_CONF.format(port=sshd_port, dir=d, user=user))
    notes = []
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd refuses to start without its privilege separation directory
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        notes.append("created /run/sshd (sshd's privilege separation directory)")
    sshd_bin = os.path.realpath(tools["sshd"])  # sshd re-execs itself: absolute path
    r = subprocess.run([sshd_bin, "-t", "-f", conf], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=30)
    if r.returncode != 0:
        raise BenchError("sshd -t failed:\n" + r.stdout)
    sshd = procs.start("sshd", [sshd_bin, "-D", "-f", conf, "-E", os.path.join(d, "sshd.log")])
    wait_port(sshd_port, 15, "sshd", procs, ("sshd",))

    args, dest = ssh_client_args(tools, d, sshd_port, user)
    # One short probe connection to learn the negotiated cipher (the tunnel itself runs quietly).
    cipher = "?"
    try:
        r = subprocess.run(args + ["-v", dest, "true"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=20)
        m = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", r.stderr)
        if m:
            cipher = m.group(1) + ("" if m.group(2) == "<implicit>" else " / " + m.group(2))
        elif r.returncode != 0:
            raise BenchError("ssh probe failed (%s):\n%s" % (r.returncode, r.stderr[-2000:]))
    except subprocess.TimeoutExpired:
        raise BenchError("ssh probe connection timed out") from None
    client = procs.start("ssh", args + [
        "-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30",
        "-o", "LogLevel=ERROR",
        "-R", "127.0.0.1:%d:127.0.0.1:%d" % (fwd_port, nginx_port), dest])
    url = "https://127.0.0.1:%d" % fwd_port
    wait_http(tools, url + PODS_PATH, 20, "ssh -R forward", procs=procs, names=("ssh", "sshd"))
    return {"sshd": sshd, "ssh": client, "url": url, "cipher": cipher, "notes": notes,
            "roots": [client.pid, sshd.pid]}


# --------------------------------------------------------------------------- arc

def write_nginx_kubeconfig(path, nginx_url, ca_pem, token):
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bench-nginx", "cluster": {
            "server": nginx_url,
            "certificate-authority-data": base64.b64encode(ca_pem).decode("ascii")}}],
        "users": [{"name": "bench", "user": {"token": token}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench-nginx", "user": "bench"}}],
        "current-context": "bench",
    }
    pki.write_private(path, yaml.safe_dump(doc, sort_keys=False).encode())


def start_oidc_issuer(procs, base, child_env):
    """A local OIDC issuer (arc.testing.oidc) in its own process, and one token it minted.

    The token is for BENCH_USER, audience OIDC_CLIENT_ID, valid for 10 hours.
    """
    d = os.path.join(base, "oidc")
    os.makedirs(d, mode=0o700, exist_ok=True)
    cmd = [sys.executable, "-m", "arc.testing.oidc", "--state-dir", d]
    p = procs.start("oidc-issuer", cmd, env=child_env)
    url_file = os.path.join(d, "url")
    deadline = time.monotonic() + 30
    url = None
    while time.monotonic() < deadline:
        procs.check(("oidc-issuer",))
        try:
            with open(url_file) as f:
                url = f.read().strip()
        except OSError:
            pass
        if url:
            break
        time.sleep(0.1)
    if not url:
        raise BenchError("the OIDC issuer wrote no %s within 30 s; last lines of its log:\n%s"
                         % (url_file, tail(os.path.join(procs.logdir, "oidc-issuer.log"))))
    r = subprocess.run(cmd + ["mint", "--sub", BENCH_USER, "--groups", BENCH_USER,
                              "--aud", OIDC_CLIENT_ID, "--ttl", "36000"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                       env=child_env)
    token = r.stdout.strip()
    if r.returncode != 0 or token.count(".") != 2:
        raise BenchError("minting an OIDC token failed (exit %s):\n%s"
                         % (r.returncode, (r.stderr or r.stdout)[-2000:]))
    return {"url": url, "ca_file": os.path.join(d, "ca.crt"), "token": token, "pid": p.pid,
            "log": os.path.join(procs.logdir, "oidc-issuer.log")}


def guard_setup(mode, base, nginx_url, ca_pem, issuer=None):
    """(guard section for demo.prepare, upstream kubeconfig, token callers send) for ``mode``."""
    if mode in ("splice", "passthrough"):
        upstream = os.path.join(base, "nginx-kubeconfig")
        if not os.path.exists(upstream):
            write_nginx_kubeconfig(upstream, nginx_url, ca_pem, API_TOKEN)
        guard = {"enabled": False} if mode == "splice" else None  # None: no guard: section
        return guard, upstream, API_TOKEN
    # Impersonation: the guard authenticates the caller's token, then sends its own
    # credential (the upstream kubeconfig's user token) with Impersonate-* headers.
    upstream = os.path.join(base, "nginx-kubeconfig-guard")
    if not os.path.exists(upstream):
        write_nginx_kubeconfig(upstream, nginx_url, ca_pem, GUARD_TOKEN)
    if mode == "static":
        token = secrets.token_urlsafe(32)
        identity = {"static": {BENCH_USER: {
            "token_sha256": hashlib.sha256(token.encode("utf-8")).hexdigest(),
            "groups": [BENCH_USER]}}}
    elif mode == "oidc":
        token = issuer["token"]
        identity = {"oidc": [{"issuer": issuer["url"], "client_id": OIDC_CLIENT_ID,
                              "ca_file": issuer["ca_file"]}]}
    else:
        raise ValueError(mode)
    return {"identity": identity}, upstream, token


def start_arc(tools, procs, base, name, transport, guard_mode, nginx_url, ca_pem, child_env,
              issuer=None):
    state = os.path.join(base, name)
    os.makedirs(state, mode=0o700, exist_ok=True)
    guard, upstream, caller_token = guard_setup(guard_mode, base, nginx_url, ca_pem, issuer)
    token_file = os.path.join(base, "api.token")
    if not os.path.exists(token_file):
        pki.write_private(token_file, API_TOKEN.encode() + b"\n")
    relay_port, client_port, dedicated_port = free_ports(3)
    files = demo.prepare(state, relay_port=relay_port, client_port=client_port,
                         upstream_kubeconfig=upstream, api_token_file=token_file,
                         transport=transport, guard=guard)
    with open(files.agent_config) as f:
        agent_guard = (yaml.safe_load(f) or {}).get("guard")
    if guard_mode == "passthrough" and agent_guard is not None:
        raise BenchError("%s: expected no guard: section in %s (the default), found %r"
                         % (name, files.agent_config, agent_guard))
    audit_file = (agent_guard or {}).get("audit", {}).get("destination")
    # wrk cannot choose its TLS server name apart from the URL host: give the cluster its
    # own listener (a port dedicated to one cluster needs no SNI).
    with open(files.client_config) as f:
        text = f.read()
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    client_cfg = yaml.safe_load(text)
    client_cfg["clusters"][0]["listen"] = "tcp:%d:interface=127.0.0.1" % dedicated_port
    with open(files.client_config, "w") as f:
        f.write(header)
        yaml.safe_dump(client_cfg, f, sort_keys=False)
    cluster = client_cfg["clusters"][0]["name"]

    parts = {}
    for part, cfg in (("relay", files.relay_config), ("agent", files.agent_config),
                      ("client", files.client_config)):
        pname = "%s-%s" % (name, part)
        argv = [sys.executable, "-m", "twisted", "--log-format=text", "arc-" + part,
                "--config", cfg]
        parts[part] = procs.start(pname, argv, cwd=state, env=child_env)
        if part == "relay":
            wait_port(relay_port, 30, pname, procs, (pname,))
    names = tuple("%s-%s" % (name, p) for p in parts)
    logs = [os.path.join(procs.logdir, n + ".log") for n in names]
    if guard_mode == "oidc":
        names += ("oidc-issuer",)
        logs.append(issuer["log"])

    # The client writes a kubeconfig for kubectl; check what it wrote and use its server name.
    deadline = time.monotonic() + 30
    server_name = None
    while time.monotonic() < deadline:
        procs.check(names)
        try:
            with open(files.kubeconfig) as f:
                kc = yaml.safe_load(f) or {}
            for c in kc.get("clusters") or []:
                if c.get("name") == cluster or cluster in c.get("name", ""):
                    server_name = c["cluster"].get("tls-server-name")
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            pass
        if server_name:
            break
        time.sleep(0.2)
    if not server_name:
        raise BenchError("%s: the client wrote no kubeconfig entry with tls-server-name "
                         "to %s within 30 s" % (name, files.kubeconfig))
    auth = ["-H", "Authorization: Bearer " + caller_token]
    sni_args = ["--connect-to", "%s:443:127.0.0.1:%d" % (server_name, client_port)]
    sni_url = "https://%s" % server_name
    wait_http(tools, sni_url + PODS_PATH, 30, "%s chain (by SNI %s)" % (name, server_name),
              extra=sni_args + auth, procs=procs, names=names)
    url = "https://127.0.0.1:%d" % dedicated_port
    wait_http(tools, url + PODS_PATH, 15, "%s chain (dedicated port)" % name,
              extra=auth, procs=procs, names=names)
    # What reaches nginx must be what the mode promises: the caller's token unchanged
    # (splice, passthrough), or the guard's own token with Impersonate-* headers.
    status, body = curl_body(tools, url + IDENTITY_PATH, auth)
    if guard_mode == "static":
        expected = "Bearer %s|%s|%s" % (GUARD_TOKEN, BENCH_USER, BENCH_USER)
    elif guard_mode == "oidc":
        # without username_prefix an OIDC user is ISSUER#sub, as in Kubernetes
        expected = "Bearer %s|%s#%s|%s" % (GUARD_TOKEN, issuer["url"], BENCH_USER, BENCH_USER)
    else:
        expected = "Bearer %s||" % caller_token
    if status != "200" or body != expected:
        raise BenchError("%s: nginx received the identity headers %r (status %s), expected %r"
                         % (name, body, status, expected))
    if guard_mode in ("static", "oidc"):
        # The guard must refuse a caller without a valid token, or it is not checking.
        status = curl_status(tools, url + PODS_PATH,
                             ["-H", "Authorization: Bearer not-a-valid-token"])
        if status != "401":
            raise BenchError("%s: the guard answered %s, not 401, to an invalid token"
                             % (name, status))
    return {"url": url, "sni_url": sni_url, "sni_args": sni_args, "server_name": server_name,
            "names": names, "roots": [p.pid for p in parts.values()], "logs": logs,
            "agent_log": os.path.join(procs.logdir, name + "-agent.log"),
            "audit_file": audit_file, "transport": transport, "guard": guard_mode,
            "token": caller_token}


# --------------------------------------------------------------------------- workloads

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        raise ValueError(text)
    return round(float(m.group(1)) * _UNITS[m.group(2)], 6)


def parse_wrk(out):
    res = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    res["requests"] = int(m.group(1)) if m else 0
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(r"^\s+%s(?:\.0+)?%%\s+(\S+)" % pct, out, re.M)
        res[key] = _ms(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def run_wrk(tools, url, threads, conns, duration, timeout_s, token=API_TOKEN):
    cmd = [tools["wrk"], "-t%d" % threads, "-c%d" % conns, "-d%ds" % duration, "--latency",
           "--timeout", "%ds" % timeout_s, "-H", "Authorization: Bearer " + token,
           url + PODS_PATH]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=duration + timeout_s + 30)
    except subprocess.TimeoutExpired:
        return {"rps": None, "requests": 0, "exit": "timeout",
                "raw": "wrk did not finish within %d s" % (duration + timeout_s + 30)}
    res = parse_wrk(r.stdout)
    res["exit"] = r.returncode
    if res["rps"] is None:
        res["raw"] = r.stdout[-2000:]
    return res


def run_curl_bulk(tools, url, extra, expected, max_time, token=API_TOKEN):
    cmd = [tools["curl"], "-sS", "-k", "-o", "/dev/null", "--max-time", str(max_time),
           "--speed-limit", "1024", "--speed-time", "20",
           "-H", "Authorization: Bearer " + token,
           "-w", "%{http_code} %{size_download} %{speed_download} %{time_total}"]
    cmd += list(extra) + [url + BULK_PATH]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=max_time + 30)
    except subprocess.TimeoutExpired:
        return {"exit": "timeout", "error": "curl did not finish within %d s" % (max_time + 30)}
    parts = r.stdout.split()
    res = {"exit": r.returncode}
    if len(parts) == 4:
        res.update(code=parts[0], bytes=int(float(parts[1])), mbps=float(parts[2]) / 1e6,
                   seconds=float(parts[3]))
    if r.returncode != 0 or res.get("bytes") != expected or res.get("code") != "200":
        res["error"] = (r.stderr.strip() or "unexpected result: " + r.stdout.strip())
    return res


def run_hol(tools, target, opts):
    """Head-of-line blocking: wrk (2 threads, HOL_CONNS connections) on the small GET, first
    alone, then while curl downloads HOL_PATH through the same path (for arc: through the same
    client, so over the same tunnel).  Downloads are restarted back to back until the loaded
    wrk run ends, then the running one is stopped, so the whole measurement runs under load."""
    d, timeout, token = opts.duration, opts.wrk_timeout, target["token"]
    res = {}
    idle = run_wrk(tools, target["url"], 2, HOL_CONNS, d, timeout, token)
    res["idle"] = idle
    res["p99_idle_ms"] = idle.get("p99_ms")
    res["p50_idle_ms"] = idle.get("p50_ms")
    res["requests"] = idle.get("requests", 0)

    cmd = [tools["curl"], "-sS", "-k", "-o", "/dev/null", "-H", "Authorization: Bearer " + token,
           "-w", "%{http_code} %{size_download}"]
    cmd += list(target.get("sni_args", ())) + [target.get("sni_url", target["url"]) + HOL_PATH]
    # Each download is bounded by --max-time: at most --hol-max-time, and at most until the
    # end of the loaded wrk run, where curl stops itself (exit 28) and still reports its bytes.
    window_end = time.monotonic() + HOL_RAMP_S + d + 0.3
    state = {"done": False, "completed": 0, "bytes": 0, "errors": [], "current": None}
    lock = threading.Lock()

    def downloads():
        while True:
            left = window_end - time.monotonic()
            with lock:
                if state["done"] or left < 0.2:
                    return
                p = subprocess.Popen(cmd[:1] + ["--max-time", "%.2f" % min(left, opts.hol_max_time)]
                                     + cmd[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
                state["current"] = p
            out, err = p.communicate()
            with lock:
                state["current"] = None
                parts = out.split()
                got = int(float(parts[1])) if len(parts) == 2 else 0
                if p.returncode == 0 and parts[:1] == ["200"]:
                    state["completed"] += 1
                    state["bytes"] += got
                elif p.returncode == 28 and time.monotonic() >= window_end - 0.3:
                    state["bytes"] += got  # stopped at the end of the window, as intended
                    return
                else:
                    state["errors"].append("curl exit %s: %s %s" % (p.returncode, out.strip(),
                                                                    err.strip()))
                    if len(state["errors"]) >= 3 or state["done"]:
                        return
            time.sleep(0.5)

    th = threading.Thread(target=downloads, daemon=True)
    th.start()
    time.sleep(HOL_RAMP_S)  # let the download reach full speed first
    t0 = time.monotonic()
    loaded = run_wrk(tools, target["url"], 2, HOL_CONNS, d, timeout, token)
    window = time.monotonic() - t0
    th.join(timeout=max(0, window_end - time.monotonic()) + 10)
    with lock:
        state["done"] = True
        p = state["current"]
        if p is not None and p.poll() is None:
            p.terminate()  # the curl this function started; not expected (--max-time)
            state["errors"].append("a download outlived its --max-time and was stopped")
    res["loaded"] = loaded
    res["p99_loaded_ms"] = loaded.get("p99_ms")
    res["p50_loaded_ms"] = loaded.get("p50_ms")
    res["requests"] += loaded.get("requests", 0)
    res["socket_errors"] = idle.get("socket_errors", 0) + loaded.get("socket_errors", 0)
    res["non_2xx"] = idle.get("non_2xx", 0) + loaded.get("non_2xx", 0)
    res["rps_idle"], res["rps_loaded"] = idle.get("rps"), loaded.get("rps")
    if res["p99_idle_ms"] and res["p99_loaded_ms"] is not None:
        res["p99_ratio"] = res["p99_loaded_ms"] / res["p99_idle_ms"]
    res["downloads_completed"] = state["completed"]
    # what the download(s) moved from the start of the first to the end of the loaded wrk run
    res["download_mb"] = round(state["bytes"] / 1e6, 1)
    res["download_mbps"] = round(state["bytes"] / 1e6 / (window + HOL_RAMP_S), 1)
    if state["errors"]:
        res["error"] = "; ".join(state["errors"])
    time.sleep(1)  # let the path settle after the interrupted download
    return res


def run_setup(target, n):
    """Connection set-up: n sequential new TCP + TLS connections, each sending one small GET;
    time from connect() to the first response byte (and, within it, to the end of the TLS
    handshake).  No TLS session is resumed: every connection does a full handshake."""
    host, port = target["url"].split("//", 1)[1].rsplit(":", 1)
    port = int(port)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
           "Connection: close\r\n\r\n" % (PODS_PATH, host, port, target["token"])).encode()
    ttfb, handshake, errors = [], [], []
    for _ in range(n):
        try:
            t0 = time.perf_counter()
            raw = socket.create_connection((host, port), timeout=10)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s = ctx.wrap_socket(raw)
            try:
                t1 = time.perf_counter()
                s.sendall(req)
                data = s.recv(65536)
                t2 = time.perf_counter()
                if not data.startswith(b"HTTP/1.1 200"):
                    raise OSError("answer %r" % data[:40])
                head, _, body = data.partition(b"\r\n\r\n")
                while not _:
                    more = s.recv(65536)
                    if not more:
                        raise OSError("connection closed in the response head")
                    data += more
                    head, _, body = data.partition(b"\r\n\r\n")
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                want = int(m.group(1)) if m else 0
                while len(body) < want:
                    more = s.recv(65536)
                    if not more:
                        raise OSError("connection closed in the body")
                    body += more
            finally:
                s.close()
        except (OSError, ssl.SSLError) as e:
            errors.append(str(e))
            if len(errors) >= 5:
                break
            continue
        handshake.append((t1 - t0) * 1e3)
        ttfb.append((t2 - t0) * 1e3)
    res = {"connections": len(ttfb), "requests": len(ttfb)}
    if ttfb:
        res["p50_ms"] = statistics.median(ttfb)
        res["p99_ms"] = percentile(ttfb, 99)
        res["handshake_p50_ms"] = statistics.median(handshake)
        res["request_p50_ms"] = statistics.median([a - b for a, b in zip(ttfb, handshake)])
    if errors:
        res["error"] = "%d of %d connections failed: %s" % (len(errors), n, errors[0])
    return res


def percentile(values, pct):
    """Nearest-rank percentile."""
    v = sorted(values)
    return v[max(0, min(len(v) - 1, math.ceil(pct / 100.0 * len(v)) - 1))]


def delayed_acks():
    """The kernel's count of delayed ACKs sent (all sockets; TcpExt DelayedACKs)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
        return int(lines[1][lines[0].index("DelayedACKs")])
    except (OSError, ValueError, IndexError):
        return None


def measure(target, fn):
    """Run fn() and attribute the CPU its path processes used meanwhile."""
    roots = target["roots"]
    acks = delayed_acks()
    before = cpu_seconds(roots) if roots else None
    backend_before = cpu_seconds([target["nginx_pid"]])
    t0 = time.monotonic()
    res = fn()
    res["wall_s"] = round(time.monotonic() - t0, 3)
    if roots:
        res["path_cpu_s"] = round(cpu_seconds(roots) - before, 3)
    res["backend_cpu_s"] = round(cpu_seconds([target["nginx_pid"]]) - backend_before, 3)
    after = delayed_acks()
    if acks is not None and after is not None:
        res["delayed_acks"] = after - acks
    return res


HOL_CONNS = 8       # wrk connections in the head-of-line workload
HOL_RAMP_S = 0.5    # seconds the download runs before the loaded wrk run starts
# workloads that are not measured on every target
WORKLOAD_SKIP = {"hol": ("direct",)}


def workloads(opts):
    d = opts.duration
    return [
        ("small_c1", "small GET, 1 connection (wrk -t1 -c1)",
         lambda t, tools: run_wrk(tools, t["url"], 1, 1, d, opts.wrk_timeout, t["token"])),
        ("small_c64", "small GET, 64 connections (wrk -t2 -c64)",
         lambda t, tools: run_wrk(tools, t["url"], 2, 64, d, opts.wrk_timeout, t["token"])),
        ("bulk", "bulk %d MiB (curl)" % opts.bulk_mib,
         lambda t, tools: run_curl_bulk(tools, t.get("sni_url", t["url"]), t.get("sni_args", ()),
                                        opts.bulk_mib << 20, opts.bulk_max_time, t["token"])),
        ("hol", "small GET (wrk -t2 -c%d) idle, then during a %d MiB download"
         % (HOL_CONNS, opts.hol_mib),
         lambda t, tools: run_hol(tools, t, opts)),
        ("setup", "%d new TLS connections, one GET each" % opts.setup_conns,
         lambda t, tools: run_setup(t, opts.setup_conns)),
    ]


def derive(key, res):
    """Per-sample derived figures: CPU per request / per GB."""
    cpu = res.get("path_cpu_s")
    if key == "setup":
        if cpu is not None and res.get("connections"):
            res["cpu_us_per_conn"] = cpu / res["connections"] * 1e6
    elif key == "hol":
        pass
    elif key.startswith("small"):
        if cpu is not None and res.get("requests"):
            res["cpu_us_per_req"] = cpu / res["requests"] * 1e6
        if res.get("requests"):
            res["backend_cpu_us_per_req"] = res["backend_cpu_s"] / res["requests"] * 1e6
    else:
        if cpu is not None and res.get("bytes"):
            res["cpu_s_per_gb"] = cpu / (res["bytes"] / 1e9)
    return res


def sample_problem(key, res):
    if key == "hol":
        bad = [sample_problem("small", res[k]) for k in ("idle", "loaded") if k in res]
        bad.append(res.get("error"))
        return ", ".join(b for b in bad if b) or None
    if key.startswith("small"):
        if res.get("rps") is None:
            return "wrk gave no result (exit %s): %s" % (res.get("exit"), res.get("raw", ""))
        bad = []
        if res.get("socket_errors"):
            bad.append("%d socket errors" % res["socket_errors"])
        if res.get("non_2xx"):
            bad.append("%d non-2xx responses" % res["non_2xx"])
        return ", ".join(bad) or None
    return res.get("error")


# --------------------------------------------------------------------------- report

METRICS = [
    # (row label, workload, sample field, format, direct has it)
    ("c=1   requests/s", "small_c1", "rps", "{:.0f}"),
    ("c=1   p50 latency ms", "small_c1", "p50_ms", "{:.3f}"),
    ("c=1   p99 latency ms", "small_c1", "p99_ms", "{:.3f}"),
    ("c=1   added p50 ms (vs direct)", "small_c1", "added_p50_ms", "{:.3f}"),
    ("c=1   CPU µs/request (path)", "small_c1", "cpu_us_per_req", "{:.0f}"),
    ("c=1   TCP delayed ACKs (host)", "small_c1", "delayed_acks", "{:.0f}"),
    ("c=64  requests/s", "small_c64", "rps", "{:.0f}"),
    ("c=64  p50 latency ms", "small_c64", "p50_ms", "{:.3f}"),
    ("c=64  p99 latency ms", "small_c64", "p99_ms", "{:.3f}"),
    ("c=64  added p50 ms (vs direct)", "small_c64", "added_p50_ms", "{:.3f}"),
    ("c=64  CPU µs/request (path)", "small_c64", "cpu_us_per_req", "{:.0f}"),
    ("c=64  TCP delayed ACKs (host)", "small_c64", "delayed_acks", "{:.0f}"),
    ("bulk  MB/s", "bulk", "mbps", "{:.1f}"),
    ("bulk  CPU s/GB (path)", "bulk", "cpu_s_per_gb", "{:.2f}"),
    ("HOL   p99 ms, idle (c=8)", "hol", "p99_idle_ms", "{:.3f}"),
    ("HOL   p99 ms, during download", "hol", "p99_loaded_ms", "{:.3f}"),
    ("HOL   p99 ratio loaded/idle", "hol", "p99_ratio", "{:.2f}×"),
    ("HOL   p50 ms, idle / during download", "hol", ("p50_idle_ms", "p50_loaded_ms"),
     "{:.3f} / {:.3f}"),
    ("HOL   requests/s, idle / during download", "hol", ("rps_idle", "rps_loaded"),
     "{:.0f} / {:.0f}"),
    ("HOL   download MB/s meanwhile", "hol", "download_mbps", "{:.1f}"),
    ("setup median ms (connect → 1st byte)", "setup", "p50_ms", "{:.3f}"),
    ("setup p99 ms", "setup", "p99_ms", "{:.3f}"),
    ("setup TLS handshake median ms", "setup", "handshake_p50_ms", "{:.3f}"),
    ("setup CPU µs/connection (path)", "setup", "cpu_us_per_conn", "{:.0f}"),
]


def medians(samples):
    """{workload: {field: median}} over the samples of one target."""
    out = {}
    for key, runs in samples.items():
        fields = {}
        for res in runs:
            for k, v in res.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    fields.setdefault(k, []).append(v)
        out[key] = {k: statistics.median(v) for k, v in fields.items()}
    return out


def add_latency_deltas(summary):
    direct = summary.get("direct", {})
    for name, s in summary.items():
        for key in ("small_c1", "small_c64"):
            d = direct.get(key, {}).get("p50_ms")
            v = s.get(key, {}).get("p50_ms")
            if d is not None and v is not None:
                s[key]["added_p50_ms"] = v - d


def ratio(a, b):
    if a is None or b is None or b <= 0 or a < 0:
        return None
    return a / b


def _cell(fmt, v):
    return "n/a" if v is None else fmt.format(v)


def figures_rows(summary, names, flagged):
    """Header and rows of the table of medians: one column per target."""
    header = ["metric (median)"] + [TARGET_TITLES.get(n, n) for n in names]
    rows = []
    for label, key, field, fmt in METRICS:
        row = [label]
        for n in names:
            if isinstance(field, tuple):
                vs = [summary.get(n, {}).get(key, {}).get(f) for f in field]
                cell = "n/a" if None in vs else fmt.format(*vs)
            elif n == "direct" and field.startswith("cpu"):
                cell = "—"
            else:
                cell = _cell(fmt, summary.get(n, {}).get(key, {}).get(field))
            if (n, key) in flagged:
                cell += " !"
            row.append(cell)
        rows.append(row)
    return header, rows


RATIO_SKIP = ("p99_ratio", "download_mbps")


def ratio_rows(summary, names):
    """Header and rows of arc's figures divided by ssh -R's (None when there is no ssh)."""
    cols = [n for n in names if n.startswith("arc")]
    if "ssh" not in names or not cols:
        return None
    header = ["ratio vs ssh -R (median)"] + ["%s/ssh-R" % n for n in cols]
    rows = []
    for label, key, field, fmt in METRICS:
        if field == "delayed_acks" or isinstance(field, tuple) or field in RATIO_SKIP:
            continue  # a diagnostic count, a pair, or already a ratio: no ratio
        row = [label]
        for n in cols:
            r = ratio(summary.get(n, {}).get(key, {}).get(field),
                      summary.get("ssh", {}).get(key, {}).get(field))
            row.append("n/a" if r is None else "%.2f×" % r)
        rows.append(row)
    return header, rows


GUARD_ROWS = [
    # (label, workload, field, kind, format): kind "diff" = target − baseline,
    # "ratio" = target / baseline.  The p50 difference is the difference of the added p50s.
    ("c=1   CPU µs/request (path)", "small_c1", "cpu_us_per_req", "diff", "{:+.0f}"),
    ("c=1   added p50 ms", "small_c1", "p50_ms", "diff", "{:+.3f}"),
    ("c=1   requests/s", "small_c1", "rps", "ratio", "{:.2f}×"),
    ("c=64  CPU µs/request (path)", "small_c64", "cpu_us_per_req", "diff", "{:+.0f}"),
    ("c=64  added p50 ms", "small_c64", "p50_ms", "diff", "{:+.3f}"),
    ("c=64  requests/s", "small_c64", "rps", "ratio", "{:.2f}×"),
    ("bulk  MB/s", "bulk", "mbps", "ratio", "{:.2f}×"),
    ("bulk  CPU s/GB (path)", "bulk", "cpu_s_per_gb", "diff", "{:+.2f}"),
]


def guard_cost(summary, names):
    """{target: {row label: value}}: what the guard adds to arc-splice (differences of medians)."""
    base = summary.get(GUARD_BASELINE) if GUARD_BASELINE in names else None
    if not base:
        return {}
    out = {}
    for n in GUARD_COMPARED:
        if n not in names:
            continue
        values = {}
        for label, key, field, kind, _ in GUARD_ROWS:
            a = summary.get(n, {}).get(key, {}).get(field)
            b = base.get(key, {}).get(field)
            if a is None or b is None:
                values[label] = None
            elif kind == "diff":
                values[label] = a - b
            else:
                values[label] = ratio(a, b)
        out[n] = values
    return out


def guard_rows(cost):
    if not cost:
        return None
    cols = list(cost)
    header = ["guard cost (median − %s)" % GUARD_BASELINE] + cols
    rows = []
    for label, _, _, kind, fmt in GUARD_ROWS:
        rows.append([label + (" (ratio)" if kind == "ratio" else "")]
                    + [_cell(fmt, cost[n].get(label)) for n in cols])
    return header, rows


def render_table(header, rows):
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = []
    fmt_row = lambda r: "  ".join(  # noqa: E731
        (c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])) for i, c in enumerate(r))
    lines.append(fmt_row(header))
    lines.append("  ".join("-" * w for w in widths))
    for i, r in enumerate(rows):
        if i and rows[i][0][:5] != rows[i - 1][0][:5]:
            lines.append("")
        lines.append(fmt_row(r))
    return "\n".join(lines)


def render_markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([" ".join(r[0].split())] + r[1:]) + " |")
    return "\n".join(lines)


def audit_counts(target):
    """{records, allow, status_200} written by the agent's guard during the whole run.

    The default configuration (arc, arc-ws) writes audit lines to the agent's stdout,
    i.e. into its log; the others write to the audit file demo.prepare() configures.
    """
    if target.get("guard") is None:
        return None
    path = target.get("audit_file") or target.get("agent_log")
    counts = {"records": 0, "allow": 0, "status_200": 0, "file": path}
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.startswith(b"{"):
                    continue  # a log line of the agent's
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict) or "audit_id" not in record:
                    continue
                counts["records"] += 1
                counts["allow"] += record.get("decision") == "allow"
                counts["status_200"] += record.get("status") == 200
    except OSError:
        return counts
    return counts


def arc_log_findings(paths):
    """Warnings, errors and tracebacks in the arc logs."""
    found = []
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    if re.search(r"#(warn|error|critical)\]|Traceback|Unhandled", line):
                        found.append("%s: %s" % (os.path.basename(path), line.rstrip()))
        except OSError:
            pass
    return found


# --------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Compare arc with a direct TLS connection and with ssh -R on loopback.")
    p.add_argument("--quick", action="store_true",
                   help="one repetition, 2 s wrk runs (a smoke test, not for quoting)")
    p.add_argument("--repeat", "-r", type=int, default=None,
                   help="repetitions of every measurement (default 5, 1 with --quick)")
    p.add_argument("--duration", "-d", type=int, default=None,
                   help="seconds per wrk run (default 5, 2 with --quick)")
    p.add_argument("--bulk-mib", type=int, default=256, help="size of /bulk (default 256)")
    p.add_argument("--bulk-max-time", type=int, default=300,
                   help="give up a bulk download after this many seconds (default 300)")
    p.add_argument("--hol-mib", type=int, default=1024,
                   help="size of the file downloaded during the head-of-line workload "
                        "(default 1024)")
    p.add_argument("--hol-max-time", type=int, default=120,
                   help="give up one head-of-line download after this many seconds (default 120)")
    p.add_argument("--setup-conns", type=int, default=200,
                   help="new connections per connection set-up run (default 200)")
    p.add_argument("--wrk-timeout", type=int, default=5,
                   help="wrk's per-request timeout in seconds (default 5)")
    p.add_argument("--targets", default=",".join(TARGET_TITLES),
                   help="comma-separated subset of %s (default: all)" % ",".join(TARGET_TITLES))
    p.add_argument("--out", help="JSON results file (default .bench/results-DATE.json); the "
                                 "tables also go to the same name ending in .md")
    p.add_argument("--no-install", action="store_true",
                   help="never run apt-get; fail if a tool is missing")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, logs) after the run")
    opts = p.parse_args(argv)
    if opts.repeat is None:
        opts.repeat = 1 if opts.quick else 5
    if opts.duration is None:
        opts.duration = 2 if opts.quick else 5
    opts.targets = [t.strip() for t in opts.targets.split(",") if t.strip()]
    for t in opts.targets:
        if t not in TARGET_TITLES:
            p.error("unknown target %r" % t)
    if min(opts.repeat, opts.duration, opts.bulk_mib, opts.hol_mib, opts.hol_max_time,
           opts.setup_conns) < 1:
        p.error("--repeat, --duration, --bulk-mib, --hol-mib, --hol-max-time and --setup-conns "
                "must be positive")
    return opts


def child_environment():
    """Environment for the arc processes: import the same arc this script imported."""
    env = dict(os.environ)
    arc_root = os.path.dirname(os.path.dirname(os.path.abspath(arc.__file__)))
    paths = [arc_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.pop("KUBECONFIG", None)
    return env


def _on_signal(signum, frame):
    raise Stop("signal %d" % signum)


def main(argv=None):
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    tools = ensure_tools(not opts.no_install)
    info = machine_info()
    versions = tool_versions(tools)
    base = tempfile.mkdtemp(prefix="arc-bench-")
    logdir = os.path.join(base, "logs")
    os.makedirs(logdir)
    procs = Processes(logdir)
    failed = True
    notes = []
    try:
        ca, ca_key = pki.new_ca("arc bench backend CA")
        nginx_port, sshd_port, fwd_port = free_ports(3)
        log("temporary directory %s" % base)
        log("starting nginx on 127.0.0.1:%d" % nginx_port)
        nginx, nginx_url = start_nginx(tools, procs, base, nginx_port, ca, ca_key,
                                       opts.bulk_mib << 20, opts.hol_mib << 20)
        targets = {}
        if "direct" in opts.targets:
            targets["direct"] = {"url": nginx_url, "roots": [], "names": ("nginx",),
                                 "token": API_TOKEN}
        if "ssh" in opts.targets:
            log("starting sshd on 127.0.0.1:%d and ssh -R 127.0.0.1:%d" % (sshd_port, fwd_port))
            s = start_ssh(tools, procs, base, nginx_port, sshd_port, fwd_port)
            notes += s["notes"]
            targets["ssh"] = {"url": s["url"], "roots": s["roots"], "cipher": s["cipher"],
                              "names": ("ssh", "sshd", "nginx"), "token": API_TOKEN}
        env = child_environment()
        issuer = None
        if "arc-oidc" in opts.targets:
            log("starting a local OIDC issuer (python -m arc.testing.oidc)")
            issuer = start_oidc_issuer(procs, base, env)
            log("OIDC issuer %s; minted a token for %s" % (issuer["url"], BENCH_USER))
        for name, (transport, guard_mode) in ARC_TARGETS.items():
            if name in opts.targets:
                log("starting %s (relay, agent, client; transport %s, guard %s)"
                    % (name, transport, guard_mode))
                a = start_arc(tools, procs, base, name, transport, guard_mode, nginx_url, ca,
                              env, issuer)
                a["names"] += ("nginx",)
                targets[name] = a
        for t in targets.values():
            t["nginx_pid"] = nginx.pid
        names = [n for n in TARGET_TITLES if n in targets]

        if "ssh" in targets:
            sshd_tree = tree([targets["ssh"]["roots"][1]])
            log("ssh -R path: ssh pid %d; sshd processes: %s" % (
                targets["ssh"]["roots"][0],
                "; ".join("%d %s" % (pid, proc_name(pid)) for pid in sshd_tree)))

        log("warming up every path (1 s of wrk each)")
        for n in names:
            run_wrk(tools, targets[n]["url"], 1, 4, 1, opts.wrk_timeout, targets[n]["token"])

        samples = {n: {} for n in names}
        flagged = set()
        problems = []
        dead = {}
        for key, title, fn in workloads(opts):
            for rep in range(opts.repeat):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for n in order:
                    t = targets[n]
                    if n in dead or n in WORKLOAD_SKIP.get(key, ()):
                        continue
                    try:
                        procs.check(t["names"])
                    except BenchError as e:
                        dead[n] = str(e)
                        problems.append("%s: stopped measuring: %s" % (n, e))
                        log("%s: %s" % (n, e))
                        continue
                    res = derive(key, measure(t, lambda: fn(t, tools)))
                    samples[n].setdefault(key, []).append(res)
                    problem = sample_problem(key, res)
                    if problem:
                        flagged.add((n, key))
                        problems.append("%s / %s / run %d: %s" % (n, key, rep + 1, problem))
                    log("%-10s %-9s run %d/%d: %s"
                        % (n, key, rep + 1, opts.repeat, brief(key, res)))
            for n in names:
                t = targets[n]
                if t["roots"]:
                    t.setdefault("peak_rss_mib", {})[key] = round(peak_rss_mib(t["roots"]), 1)

        summary = {n: medians(samples[n]) for n in names}
        add_latency_deltas(summary)
        cost = guard_cost(summary, names)
        arc_logs = [p for n in names for p in targets[n].get("logs", ())]
        findings = arc_log_findings(arc_logs)
        audits = {}
        for n in names:
            counts = audit_counts(targets[n])
            if counts is None:
                continue
            audits[n] = counts
            served = sum(r.get("requests", 0) for k in ("small_c1", "small_c64")
                         for r in samples[n].get(k, ()))
            served += sum(1 for r in samples[n].get("bulk", ()) if r.get("code") == "200")
            served += sum(r.get("requests", 0) for k in ("hol", "setup")
                          for r in samples[n].get(k, ()))
            served += sum(r.get("downloads_completed", 0) for r in samples[n].get("hol", ()))
            counts["requests_measured"] = served
            if targets[n]["guard"] == "splice":
                if counts["records"]:
                    problems.append("%s: the guard is disabled but wrote %d audit records"
                                    % (n, counts["records"]))
            elif counts["allow"] < served:
                problems.append("%s: %d requests were served but the guard's audit has only %d "
                                "allowed records (%s)" % (n, served, counts["allow"],
                                                          counts["file"]))

        # ---- report
        info["loadavg_end"] = loadavg()
        head = [
            "arc benchmark — %s, commit %s" % (info["date"], info["commit"]),
            "machine: nproc=%s  cpu=%s  kernel=%s  python=%s  load avg start %s / end %s" % (
                info["nproc"], info["cpu"], info["kernel"], info["python"], info["loadavg"],
                info["loadavg_end"]),
            "tools:   %s | %s | %s | %s | arc %s (%s)" % (
                versions["nginx"], versions["ssh"], versions["wrk"].split(" [")[0],
                " ".join(versions["curl"].split()[:2]), versions["arc"], versions["arc_path"]),
            "runs:    %d per figure (medians), wrk %d s per run, bulk %d MiB, HOL download %d "
            "MiB, %d connections per set-up run; nginx TLS on 127.0.0.1, 1 worker, HTTP/1.1 "
            "keep-alive" % (opts.repeat, opts.duration, opts.bulk_mib, opts.hol_mib,
                            opts.setup_conns),
        ]
        if "ssh" in targets:
            head.append("ssh -R:  default cipher negotiated: %s" % targets["ssh"]["cipher"])
        tables = [figures_rows(summary, names, flagged), ratio_rows(summary, names),
                  guard_rows(cost)]
        tables = [t for t in tables if t]
        legend = [
            "CPU (path) = user+system CPU of the processes between the client tool and nginx: "
            "ssh -R: ssh + sshd (with its per-connection children); arc: client + relay + agent; "
            "direct: none.",
            "ratios: arc figure / ssh -R figure (for added p50: arc's added latency / ssh's).",
            "guard cost: a guard-on target's median minus (or, for rates, divided by) "
            "arc-splice's, where the agent splices bytes without parsing HTTP.",
            "TCP delayed ACKs: host-wide count during one run (median); many of them with a "
            "p99 near 40 ms point to Nagle/delayed-ACK stalls.",
            "HOL: wrk -t2 -c%d on the small GET alone, then while %d MiB downloads are running "
            "back to back through the same path (arc: the same client and tunnel); the ratio "
            "is the median of the per-repetition ratios (target: at most 2x)." % (
                HOL_CONNS, opts.hol_mib),
            "setup: %d sequential new TCP+TLS connections (no session resumption), one GET "
            "each; time from connect() to the first response byte." % opts.setup_conns,
        ]
        if any(t.get("peak_rss_mib") for t in targets.values()):
            legend.append("peak RSS of the path processes (MiB, after all workloads): " + ", ".join(
                "%s %.0f" % (TARGET_TITLES[n], max(targets[n]["peak_rss_mib"].values()))
                for n in names if targets[n].get("peak_rss_mib")))
        if audits:
            legend.append("guard audit records (whole run, incl. warm-up and probes; allowed; "
                          "status 200) vs requests measured: " + "; ".join(
                              "%s %d/%d/%d vs %d" % (n, c["records"], c["allow"],
                                                     c["status_200"], c["requests_measured"])
                              for n, c in audits.items()))
        tail_lines = []
        if problems:
            tail_lines.append("PROBLEMS (cells marked !):")
            tail_lines += ["  " + p for p in problems]
        if findings:
            tail_lines.append("arc logs: %d warning/error line(s):" % len(findings))
            tail_lines += ["  " + line for line in findings[:20]]
        tail_lines += ["note: " + note for note in notes]

        print()
        print("\n".join(head))
        for header, rows in tables:
            print()
            print(render_table(header, rows))
        print()
        print("\n".join(legend))
        if tail_lines:
            print()
            print("\n".join(tail_lines))

        result = {
            "machine": info, "versions": versions,
            "options": {"repeat": opts.repeat, "duration_s": opts.duration,
                        "bulk_mib": opts.bulk_mib, "hol_mib": opts.hol_mib,
                        "setup_conns": opts.setup_conns, "quick": opts.quick},
            "targets": {n: {"url": targets[n]["url"],
                            "cipher": targets[n].get("cipher"),
                            "transport": targets[n].get("transport"),
                            "guard": targets[n].get("guard"),
                            "peak_rss_mib": targets[n].get("peak_rss_mib")} for n in names},
            "medians": summary, "guard_cost_vs_splice": cost, "audit": audits,
            "samples": samples, "problems": problems,
            "arc_log_findings": findings, "notes": notes,
        }
        out = opts.out or os.path.join(
            REPO, ".bench", "results-%s.json" % datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
            f.write("\n")
        md = os.path.splitext(out)[0] + ".md"
        with open(md, "w") as f:
            f.write("\n".join(["    " + line for line in head]) + "\n\n")
            for header, rows in tables:
                f.write(render_markdown(header, rows) + "\n\n")
            f.write("\n".join("* " + line for line in legend + tail_lines) + "\n")
        print()
        print("results: %s (tables in Markdown: %s)" % (out, md))
        failed = bool(problems)
        return 1 if problems else 0
    except BenchError as e:
        print("bench failed: %s" % e, file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stop):
        print("interrupted; stopping every process started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if failed or opts.keep:
            print("configs and logs kept in %s" % base, file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def brief(key, res):
    cpu = res.get("path_cpu_s")
    cpu = "-" if cpu is None else "%.2f s" % cpu
    if key == "hol":
        return ("p99 idle %s ms, during download %s ms (%s), %s MB/s downloaded, %d downloads "
                "completed, path CPU %s%s" % (
                    res.get("p99_idle_ms"), res.get("p99_loaded_ms"),
                    "n/a" if res.get("p99_ratio") is None else "%.2fx" % res["p99_ratio"],
                    res.get("download_mbps"), res.get("downloads_completed", 0), cpu,
                    "  PROBLEM: " + sample_problem(key, res) if sample_problem(key, res) else ""))
    if key == "setup":
        return ("%s connections, median %.3f ms, p99 %.3f ms (handshake %.3f ms), path CPU %s%s"
                % (res.get("connections"), res.get("p50_ms") or 0, res.get("p99_ms") or 0,
                   res.get("handshake_p50_ms") or 0, cpu,
                   "  ERROR: " + res["error"] if res.get("error") else ""))
    if key.startswith("small"):
        problem = sample_problem(key, res)
        return "%s req/s, p50 %s ms, p99 %s ms, path CPU %s, delayed ACKs %s%s" % (
            res.get("rps"), res.get("p50_ms"), res.get("p99_ms"), cpu, res.get("delayed_acks"),
            "  PROBLEM: " + problem if problem else "")
    return "%.1f MB/s, path CPU %s%s" % (res.get("mbps") or 0, cpu,
                                         "  ERROR: " + res["error"] if res.get("error") else "")


if __name__ == "__main__":
    sys.exit(main())

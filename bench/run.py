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
spent by the processes on each path.  Watch fan-out: thousands of concurrent idle
watches (bench/watchers.py) to a backend that holds them (bench/watch_backend.py),
memory per watch in every process on the path, and the latency of one event sent to
every watch.  Idle tunnels: the relay's memory per idle agent tunnel
(bench/replica_tunnels.py).  Prints a table of medians and what the guard costs per
request (against arc-splice), the watch fan-out and the relay's idle memory against
its targets, and writes every sample to a JSON file and the tables to a Markdown file.

    python bench/run.py [--quick] [--repeat N] [--duration S] [--targets LIST]
                        [--workloads LIST] [--watches 1000,10000] [--out FILE]

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
import queue
import re
import resource
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

    def start_piped(self, name, argv, env=None):
        """A process whose stdin and stdout are pipes to this script (stderr to its log)."""
        path = os.path.join(self.logdir, name + ".log")
        err = open(path, "ab")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=err, env=env, start_new_session=True)
        finally:
            err.close()
        self.started.append((name, p, path))
        return p

    def stop(self, names, timeout=10):
        """Stop the processes called ``names`` (SIGTERM to each one's group, then SIGKILL)."""
        keep = []
        for entry in self.started:
            name, p, _ = entry
            if name not in names:
                keep.append(entry)
                continue
            if p.poll() is None:
                descendants = [pid for pid in tree([p.pid]) if pid != p.pid]
                self._signal(p.pid, signal.SIGTERM, group=True)
                try:
                    p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal(p.pid, signal.SIGKILL, group=True)
                    p.wait(timeout=5)
                for pid in descendants:
                    if read_stat(pid) is not None:
                        self._signal(pid, signal.SIGKILL)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()
        self.started = keep

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


def start_sshd(tools, procs, base, sshd_port):
    """A private sshd on 127.0.0.1 with generated keys; learns the cipher ssh negotiates."""
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
    return {"sshd": sshd, "args": args, "dest": dest, "cipher": cipher, "notes": notes}


def start_ssh_forward(tools, procs, sshd, name, fwd_port, dest_port, check_path=PODS_PATH):
    """``ssh -N -R 127.0.0.1:fwd_port:127.0.0.1:dest_port`` (a new SSH connection), up and
    answering 200 on check_path through the forward."""
    client = procs.start(name, sshd["args"] + [
        "-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30",
        "-o", "LogLevel=ERROR",
        "-R", "127.0.0.1:%d:127.0.0.1:%d" % (fwd_port, dest_port), sshd["dest"]])
    url = "https://127.0.0.1:%d" % fwd_port
    wait_http(tools, url + check_path, 20, "ssh -R forward (%s)" % name, procs=procs,
              names=(name, "sshd"))
    return client, url


def start_ssh(tools, procs, base, nginx_port, sshd_port, fwd_port, sshd=None):
    if sshd is None:
        sshd = start_sshd(tools, procs, base, sshd_port)
    client, url = start_ssh_forward(tools, procs, sshd, "ssh", fwd_port, nginx_port)
    return {"sshd": sshd["sshd"], "ssh": client, "url": url, "cipher": sshd["cipher"],
            "notes": sshd["notes"], "roots": [client.pid, sshd["sshd"].pid]}


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


def guard_setup(mode, base, nginx_url, ca_pem, issuer=None, label="nginx"):
    """(guard section for demo.prepare, upstream kubeconfig, token callers send) for ``mode``.

    ``nginx_url`` is the upstream API server (nginx, or the watch backend with ``label``
    "watch")."""
    if mode in ("splice", "passthrough"):
        upstream = os.path.join(base, label + "-kubeconfig")
        if not os.path.exists(upstream):
            write_nginx_kubeconfig(upstream, nginx_url, ca_pem, API_TOKEN)
        guard = {"enabled": False} if mode == "splice" else None  # None: no guard: section
        return guard, upstream, API_TOKEN
    # Impersonation: the guard authenticates the caller's token, then sends its own
    # credential (the upstream kubeconfig's user token) with Impersonate-* headers.
    upstream = os.path.join(base, label + "-kubeconfig-guard")
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


def start_arc_parts(procs, name, files, state, child_env):
    """Relay, agent and client of one chain, as separate processes named NAME-PART."""
    parts = {}
    for part, cfg in (("relay", files.relay_config), ("agent", files.agent_config),
                      ("client", files.client_config)):
        pname = "%s-%s" % (name, part)
        argv = [sys.executable, "-m", "twisted", "--log-format=text", "arc-" + part,
                "--config", cfg]
        parts[part] = procs.start(pname, argv, cwd=state, env=child_env)
        if part == "relay":
            wait_port(files.relay_port, 30, pname, procs, (pname,))
    return parts


def client_server_name(procs, name, files, cluster, names):
    """The TLS server name the client wrote into its kubeconfig for ``cluster``."""
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
            return server_name
        time.sleep(0.2)
    raise BenchError("%s: the client wrote no kubeconfig entry with tls-server-name "
                     "to %s within 30 s" % (name, files.kubeconfig))


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

    parts = start_arc_parts(procs, name, files, state, child_env)
    names = tuple("%s-%s" % (name, p) for p in parts)
    logs = [os.path.join(procs.logdir, n + ".log") for n in names]
    if guard_mode == "oidc":
        names += ("oidc-issuer",)
        logs.append(issuer["log"])
    server_name = client_server_name(procs, name, files, cluster, names)
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


# --------------------------------------------------------------------------- watch fan-out

WATCHERS = os.path.join(HERE, "watchers.py")
WATCH_BACKEND = os.path.join(HERE, "watch_backend.py")
REPLICA_TUNNELS = os.path.join(HERE, "replica_tunnels.py")
WATCH_SETTLE_S = 1.0    # after the path is up, before the "before" memory reading
WATCH_IDLE_S = 3.0      # every watch open and idle this long before the "after" reading
WATCH_CLOSE_S = 30      # the backend must see every watch closed this long after the watchers
WATCH_BACKLOG = 1024    # listen backlog of the arc client and the backend in the watch workload
# Targets the issue sets for the relay's idle memory, KiB.
RELAY_KIB_PER_STREAM_TARGET = 10
RELAY_KIB_PER_TUNNEL_TARGET = 50


def watch_open_timeout(count):
    return 30 + count / 40.0


def watch_event_timeout(count):
    return 20 + count / 200.0


def raise_fd_limit(wanted):
    """Raise this process's RLIMIT_NOFILE (inherited by every process it starts) towards
    ``wanted``: the hard limit too when running as root.  Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted and os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                ceiling = int(f.read())
        except (OSError, ValueError):
            ceiling = hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, ceiling), min(wanted, ceiling)))
            return min(wanted, ceiling)
        except (ValueError, OSError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def fd_limit(pid):
    """The soft limit on open files of a running process (None if unknown)."""
    try:
        with open("/proc/%d/limits" % pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return 1 << 62 if value == "unlimited" else int(value)
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_kib(pids):
    """Sum of the resident set sizes of ``pids`` in KiB."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def start_watch_backend(procs, base, ca, ca_key, env):
    d = os.path.join(base, "watch-backend")
    os.makedirs(d, exist_ok=True)
    cert, key = pki.issue(ca, ca_key, "bench-watch-backend", dns_names=["localhost"],
                          ips=["127.0.0.1"])
    pki.write_private(os.path.join(d, "server.crt"), cert, 0o644)
    pki.write_private(os.path.join(d, "server.key"), key)
    port, control = free_ports(2)
    p = procs.start("watch-backend", [
        sys.executable, WATCH_BACKEND, "--port", str(port), "--control-port", str(control),
        "--cert", os.path.join(d, "server.crt"), "--key", os.path.join(d, "server.key"),
        "--backlog", str(WATCH_BACKLOG)], env=env)
    wait_port(port, 20, "the watch backend", procs, ("watch-backend",))
    wait_port(control, 10, "the watch backend's control port", procs, ("watch-backend",))
    return {"pid": p.pid, "port": port, "control": control,
            "url": "https://127.0.0.1:%d" % port}


def backend_command(backend, cmd, timeout=10.0):
    """Send one command to the watch backend's control port; its one-line answer."""
    with socket.create_connection(("127.0.0.1", backend["control"]), timeout=timeout) as s:
        s.sendall(cmd.encode("ascii") + b"\n")
        with s.makefile("rb") as f:
            line = f.readline()
    if not line.endswith(b"\n"):
        raise BenchError("the watch backend did not answer %r within %.0f s" % (cmd, timeout))
    return line.decode("ascii", "replace").strip()


def backend_held(backend):
    answer = backend_command(backend, "count")
    if not answer.startswith("held "):
        raise BenchError("the watch backend answered %r to count" % answer)
    return int(answer.split()[1])


def rewrite_yaml(path, change):
    """Apply change(doc) to a YAML file, keeping its leading comment lines."""
    with open(path) as f:
        text = f.read()
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    doc = yaml.safe_load(text) or {}
    change(doc)
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(doc, f, sort_keys=False)


def start_watch_arc(tools, procs, base, target, run_name, backend, ca_pem, env, issuer, count):
    """A fresh relay, agent and client configured like ``target``, the agent's upstream being
    the watch backend, with room for ``count`` streams on every tunnel and for the user."""
    transport, guard_mode = ARC_TARGETS[target]
    state = os.path.join(base, "watch", run_name)
    os.makedirs(state, mode=0o700, exist_ok=True)
    guard, upstream, token = guard_setup(guard_mode, base, backend["url"], ca_pem, issuer,
                                         label="watch")
    token_file = os.path.join(base, "api.token")
    if not os.path.exists(token_file):
        pki.write_private(token_file, API_TOKEN.encode() + b"\n")
    relay_port, client_port = free_ports(2)
    limit = count + 1000
    files = demo.prepare(state, relay_port=relay_port, client_port=client_port,
                         upstream_kubeconfig=upstream, api_token_file=token_file,
                         transport=transport, guard=guard, tunnel={"max_streams": limit})
    rewrite_yaml(files.relay_config,
                 lambda d: d.setdefault("limits", {}).update(max_streams_per_user=limit))
    cluster = []

    def client_change(d):
        d["listen"] = "%s:backlog=%d" % (d["listen"], WATCH_BACKLOG)
        cluster.append(d["clusters"][0]["name"])
    rewrite_yaml(files.client_config, client_change)
    parts = start_arc_parts(procs, run_name, files, state, env)
    part_names = tuple("%s-%s" % (run_name, p) for p in parts)
    names = part_names + (("oidc-issuer",) if guard_mode == "oidc" else ())
    server_name = client_server_name(procs, run_name, files, cluster[0], names)
    wait_http(tools, "https://%s%s" % (server_name, PODS_PATH), 30,
              "%s chain to the watch backend" % run_name,
              extra=["--connect-to", "%s:443:127.0.0.1:%d" % (server_name, client_port),
                     "-H", "Authorization: Bearer " + token],
              procs=procs, names=names)
    return {"host": "127.0.0.1", "port": client_port, "server_name": server_name,
            "token": token, "names": names,
            "roots": [p.pid for p in parts.values()],
            "mem": {part: [p.pid] for part, p in parts.items()},
            "logs": [os.path.join(procs.logdir, n + ".log") for n in part_names]}


def watch_path(ctx, target, run_name, count):
    """Start what ``target`` needs between the watchers and the watch backend."""
    backend = ctx["backend"]
    if target == "direct":
        return {"host": "127.0.0.1", "port": backend["port"], "server_name": None,
                "token": API_TOKEN, "names": ("watch-backend",), "roots": [],
                "mem": {}, "logs": []}
    if target == "ssh":
        sshd = ctx["sshd"]
        (fwd,) = free_ports(1)
        client, _ = start_ssh_forward(ctx["tools"], ctx["procs"], sshd, run_name + "-ssh", fwd,
                                      backend["port"])
        sshd_pid = sshd["sshd"].pid
        return {"host": "127.0.0.1", "port": fwd, "server_name": None, "token": API_TOKEN,
                "names": (run_name + "-ssh", "sshd", "watch-backend"),
                "roots": [client.pid, sshd_pid],
                # sshd: every sshd process (the listener and each connection's processes)
                "mem": {"relay": lambda: tree([sshd_pid]), "agent": [client.pid]}, "logs": []}
    path = start_watch_arc(ctx["tools"], ctx["procs"], ctx["base"], target, run_name, backend,
                           ctx["ca"], ctx["env"], ctx["issuer"], count)
    path["names"] += ("watch-backend",)
    return path


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _mem_pids(spec):
    return spec() if callable(spec) else spec


def _read_lines(stream, q):
    for line in iter(stream.readline, b""):
        q.put(line)
    q.put(None)


def _next_json(q, timeout, phase, proc, logpath):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError("the watchers reported no %r within %.0f s" % (phase, timeout))
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            proc.wait(timeout=5)
            raise BenchError("the watchers exited (status %s) before reporting %r; last lines "
                             "of %s:\n%s" % (proc.returncode, phase, logpath, tail(logpath)))
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("phase") == phase:
            return doc


def run_watch(ctx, target, count, rep, opts):
    """One watch fan-out measurement: open ``count`` watches through ``target``, hold them
    idle, have the backend send each one event, and read memory, CPU and latencies."""
    procs, backend = ctx["procs"], ctx["backend"]
    run_name = "watch-%s-%d-r%d" % (target, count, rep + 1)
    res = {"count": count}
    problems = []
    wname = run_name + "-watchers"
    path = None
    try:
        if backend_held(backend):
            backend_command(backend, "close")  # left over from an earlier failed run
            time.sleep(0.5)
        path = watch_path(ctx, target, run_name, count)
        mem_pids = {part: _mem_pids(spec) for part, spec in path["mem"].items()}
        limits = {part: min((fd_limit(pid) or 0) for pid in pids) if pids else None
                  for part, pids in mem_pids.items()}
        res["fd_limits"] = limits
        low = {part: v for part, v in limits.items() if v is not None and v < count + 256}
        if low:
            raise BenchError("open-file limit too low for %d watches: %s" % (count, ", ".join(
                "%s %s" % kv for kv in sorted(low.items()))))
        time.sleep(WATCH_SETTLE_S)
        before = {part: rss_kib(_mem_pids(spec)) for part, spec in path["mem"].items()}
        cpu0 = cpu_seconds(path["roots"]) if path["roots"] else None
        bcpu0 = cpu_seconds([backend["pid"]])
        argv = [sys.executable, WATCHERS, "--host", path["host"], "--port", str(path["port"]),
                "--count", str(count), "--token", path["token"],
                "--concurrency", str(opts.watch_concurrency),
                "--open-timeout", "%.0f" % watch_open_timeout(count)]
        if path["server_name"]:
            argv += ["--server-name", path["server_name"]]
        w = procs.start_piped(wname, argv, env=ctx["env"])
        wlog = os.path.join(procs.logdir, wname + ".log")
        lines = queue.Queue()
        threading.Thread(target=_read_lines, args=(w.stdout, lines), daemon=True).start()
        opened = _next_json(lines, watch_open_timeout(count) + 30, "opened", w, wlog)
        res["opened"] = opened["opened"]
        res["open_failed"] = opened["failed"] + opened.get("not_answered", 0)
        res["open_s"] = opened["seconds"]
        if opened["errors"]:
            res["open_errors"] = opened["errors"]
        cpu1 = cpu_seconds(path["roots"]) if path["roots"] else None
        bcpu1 = cpu_seconds([backend["pid"]])
        res["backend_held"] = backend_held(backend)
        time.sleep(WATCH_IDLE_S)
        res["backend_held_idle"] = backend_held(backend)
        after = {part: rss_kib(_mem_pids(spec)) for part, spec in path["mem"].items()}
        res["rss_before_kib"], res["rss_after_kib"] = before, after
        if res["opened"]:
            for part in before:
                res["%s_kib_per_watch" % part] = (after[part] - before[part]) / res["opened"]
                res["%s_rss_mib" % part] = after[part] / 1024.0
        # Events: the watchers wait (bounded) for one event on each open watch.
        wait_s = watch_event_timeout(count)
        w.stdin.write(b"wait %.0f\n" % wait_s)
        w.stdin.flush()
        fired = backend_command(backend, "fire", timeout=wait_s)
        if fired.startswith("fired "):
            res["fired"] = int(fired.split()[1])
            res["fire_ms"] = float(fired.split()[2])
        else:
            problems.append("the backend answered %r to fire" % fired)
        events = _next_json(lines, wait_s + 15, "events", w, wlog)
        cpu2 = cpu_seconds(path["roots"]) if path["roots"] else None
        bcpu2 = cpu_seconds([backend["pid"]])
        res["received"] = events["received"]
        res["lost"] = events["lost"]
        res["lost_idle"] = events.get("lost_after_opened", 0)
        res["event_spread_s"] = events.get("spread_s")
        for k, v in (events.get("latency_ms") or {}).items():
            res["event_%s_ms" % k] = v
        if events["errors"]:
            res["event_errors"] = events["errors"]
        if path["roots"]:
            if res["opened"]:
                res["open_cpu_us_per_watch"] = (cpu1 - cpu0) / res["opened"] * 1e6
            if res["received"]:
                res["event_cpu_us_per_event"] = (cpu2 - cpu1) / res["received"] * 1e6
        res["backend_open_cpu_s"] = round(bcpu1 - bcpu0, 3)
        res["backend_event_cpu_s"] = round(bcpu2 - bcpu1, 3)
        # Closing: the watchers exit; every watch must end at the backend too.
        t0 = time.monotonic()
        w.stdin.close()
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            problems.append("the watchers did not exit within 30 s")
        left = None
        while time.monotonic() - t0 < WATCH_CLOSE_S:
            left = backend_held(backend)
            if not left:
                break
            time.sleep(0.2)
        res["close_s"] = round(time.monotonic() - t0, 3)
        if left:
            problems.append("%d watches still open at the backend %d s after the watchers "
                            "closed theirs" % (left, WATCH_CLOSE_S))
            backend_command(backend, "close")
        if res["opened"] < count:
            problems.append("%d of %d watches opened (%s)" % (
                res["opened"], count, "; ".join(res.get("open_errors", [])) or "no error given"))
        if res["received"] < count:
            problems.append("%d of %d watches got their event%s" % (
                res["received"], count, " (%s)" % "; ".join(res["event_errors"])
                if res.get("event_errors") else ""))
        if res["backend_held"] != res["opened"]:
            problems.append("the backend held %d watches when the watchers had %d open"
                            % (res["backend_held"], res["opened"]))
        procs.check(path["names"])
    except BenchError as e:
        problems.append(str(e))
    finally:
        # The logs up to here: what the path logs when it is stopped below is not a finding.
        logs = path["logs"] if path else [
            entry[2] for entry in procs.started if entry[0].startswith(run_name + "-")]
        res["logs"] = [[p, _size(p)] for p in logs]
        # Everything this measurement started, also when starting its path failed half-way.
        procs.stop(tuple(entry[0] for entry in procs.started
                         if entry[0].startswith(run_name + "-")))
    if problems:
        res["error"] = "; ".join(problems)
    return res


def run_tunnels(ctx, n, rep):
    """Relay memory per idle agent tunnel: bench/replica_tunnels.py with n tunnels."""
    procs = ctx["procs"]
    name = "replica-tunnels-r%d" % (rep + 1)
    d = os.path.join(ctx["base"], name)
    p = procs.start(name, [sys.executable, REPLICA_TUNNELS, str(n), "--dir", d], env=ctx["env"])
    logpath = os.path.join(procs.logdir, name + ".log")
    res = {"tunnels_wanted": n}
    try:
        p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        res["error"] = "replica_tunnels.py did not finish within 240 s"
    finally:
        procs.stop((name,))
    doc = None
    try:
        with open(logpath, errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        pass
    except OSError:
        pass
    if doc is None:
        res.setdefault("error", "replica_tunnels.py reported nothing (exit %s); last lines of "
                       "%s:\n%s" % (p.returncode, logpath, tail(logpath)))
        return res
    res.update(tunnels=doc["tunnels"], relay_rss_idle_kib=doc["relay_rss_idle_kib"],
               relay_rss_kib=doc["relay_rss_kib"], per_tunnel_kib=doc["per_tunnel_kib"])
    if doc["tunnels"] != n:
        res["error"] = "%d of %d tunnels up" % (doc["tunnels"], n)
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


def figures_rows(summary, names, flagged, keys):
    """Header and rows of the table of medians: one column per target (workloads ``keys``)."""
    header = ["metric (median)"] + [TARGET_TITLES.get(n, n) for n in names]
    rows = []
    for label, key, field, fmt in METRICS:
        if key not in keys:
            continue
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


def ratio_rows(summary, names, keys):
    """Header and rows of arc's figures divided by ssh -R's (None when there is no ssh)."""
    cols = [n for n in names if n.startswith("arc")]
    if "ssh" not in names or not cols:
        return None
    header = ["ratio vs ssh -R (median)"] + ["%s/ssh-R" % n for n in cols]
    rows = []
    for label, key, field, fmt in METRICS:
        if key not in keys:
            continue
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


def guard_rows(cost, keys):
    if not cost:
        return None
    cols = list(cost)
    header = ["guard cost (median − %s)" % GUARD_BASELINE] + cols
    rows = []
    for label, key, _, kind, fmt in GUARD_ROWS:
        if key not in keys:
            continue
        rows.append([label + (" (ratio)" if kind == "ratio" else "")]
                    + [_cell(fmt, cost[n].get(label)) for n in cols])
    return header, rows


WATCH_ROWS = [
    # (row label after "N watches:", sample field(s), format)
    ("opened / got their event", ("opened", "received"), "{:.0f} / {:.0f}"),
    ("event latency p50 ms", "event_p50_ms", "{:.1f}"),
    ("event latency p99 ms", "event_p99_ms", "{:.1f}"),
    ("time to open all s", "open_s", "{:.1f}"),
    ("relay KiB/watch (ssh -R: sshd)", "relay_kib_per_watch", "{:.1f}"),
    ("agent KiB/watch (ssh -R: ssh)", "agent_kib_per_watch", "{:.1f}"),
    ("client KiB/watch", "client_kib_per_watch", "{:.1f}"),
    ("relay RSS MiB, watches open (ssh -R: sshd)", "relay_rss_mib", "{:.0f}"),
    ("open CPU µs/watch (path)", "open_cpu_us_per_watch", "{:.0f}"),
    ("event CPU µs/event (path)", "event_cpu_us_per_event", "{:.0f}"),
]


def watch_rows(summary, names, counts, flagged):
    """Header and rows of the watch fan-out table: one column per target."""
    if not names or not counts:
        return None
    header = ["watch fan-out (median)"] + [TARGET_TITLES.get(n, n) for n in names]
    rows = []
    for count in counts:
        key = "watch_%d" % count
        for label, field, fmt in WATCH_ROWS:
            row = ["%d watches: %s" % (count, label)]
            for n in names:
                med = summary.get(n, {}).get(key, {})
                if isinstance(field, tuple):
                    vs = [med.get(f) for f in field]
                    cell = "n/a" if None in vs else fmt.format(*vs)
                elif n == "direct" and ("kib" in field or "cpu" in field or "rss" in field):
                    cell = "—"  # nothing sits between the watchers and the backend
                elif n == "ssh" and field.startswith("client"):
                    cell = "—"  # ssh -R has no third process
                else:
                    cell = _cell(fmt, med.get(field))
                if (n, key) in flagged:
                    cell += " !"
                row.append(cell)
            rows.append(row)
    return header, rows


def memory_rows(summary, names, counts, tunnels):
    """The relay's idle memory against the issue's targets: per agent tunnel (from
    replica_tunnels.py) and per watch stream (from the watch workload), KiB."""
    header = ["relay idle memory (median)", "KiB", "target", "verdict"]
    rows = []

    def verdict(v, limit):
        return "n/a" if v is None else ("met" if v <= limit else "ABOVE TARGET")
    if tunnels:
        v = tunnels.get("per_tunnel_kib")
        rows.append(["per agent tunnel (%d idle tunnels)" % tunnels["n"], _cell("{:.1f}", v),
                     "≤ %d" % RELAY_KIB_PER_TUNNEL_TARGET,
                     verdict(v, RELAY_KIB_PER_TUNNEL_TARGET)])
    for count in counts:
        for n in names:
            if not n.startswith("arc"):
                continue
            v = summary.get(n, {}).get("watch_%d" % count, {}).get("relay_kib_per_watch")
            rows.append(["per stream: %s, %d idle watches" % (n, count), _cell("{:.1f}", v),
                         "≤ %d" % RELAY_KIB_PER_STREAM_TARGET,
                         verdict(v, RELAY_KIB_PER_STREAM_TARGET)])
    return (header, rows) if rows else None


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
    """Warnings, errors and tracebacks in the arc logs (each a path, or [path, bytes to
    read])."""
    found = []
    for path in paths:
        limit = None
        if isinstance(path, (list, tuple)):
            path, limit = path
        try:
            with open(path, "rb") as f:
                data = f.read() if limit is None else f.read(limit)
        except OSError:
            continue
        for line in data.decode(errors="replace").splitlines():
            if re.search(r"#(warn|error|critical)\]|Traceback|Unhandled", line):
                found.append("%s: %s" % (os.path.basename(path), line.rstrip()))
    return found


# --------------------------------------------------------------------------- main

NGINX_WORKLOADS = ("small_c1", "small_c64", "bulk", "hol", "setup")
WORKLOADS = NGINX_WORKLOADS + ("watch", "tunnels")
WORKLOAD_ALIASES = {"small": ("small_c1", "small_c64")}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Compare arc with a direct TLS connection and with ssh -R on loopback.")
    p.add_argument("--quick", action="store_true",
                   help="one repetition, 2 s wrk runs, 200 and 1000 watches, 500 tunnels "
                        "(a smoke test, not for quoting)")
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
    p.add_argument("--watches", default=None,
                   help="comma-separated numbers of concurrent watches for the watch workload "
                        "(default 1000,10000; 200,1000 with --quick)")
    p.add_argument("--watch-repeat", type=int, default=None,
                   help="repetitions of every watch and tunnel measurement (default: --repeat, "
                        "at most 3)")
    p.add_argument("--watch-concurrency", type=int, default=100,
                   help="watches at most waiting for their answer head at once (default 100)")
    p.add_argument("--tunnels", type=int, default=None,
                   help="idle agent tunnels for the tunnels workload (default 1000; 500 with "
                        "--quick)")
    p.add_argument("--workloads", default="all",
                   help="comma-separated subset of %s (small = small_c1,small_c64; "
                        "default: all)" % ",".join(WORKLOADS))
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
    if opts.watch_repeat is None:
        opts.watch_repeat = min(opts.repeat, 3)
    if opts.tunnels is None:
        opts.tunnels = 500 if opts.quick else 1000
    if opts.watches is None:
        opts.watches = "200,1000" if opts.quick else "1000,10000"
    try:
        opts.watches = [int(w) for w in opts.watches.split(",") if w.strip()]
    except ValueError:
        p.error("--watches takes comma-separated numbers, e.g. 1000,10000")
    if not opts.watches or min(opts.watches) < 1:
        p.error("--watches needs at least one positive number")
    opts.targets = [t.strip() for t in opts.targets.split(",") if t.strip()]
    for t in opts.targets:
        if t not in TARGET_TITLES:
            p.error("unknown target %r" % t)
    wanted = [w.strip() for w in opts.workloads.split(",") if w.strip()]
    chosen = set()
    for w in wanted:
        if w == "all":
            chosen.update(WORKLOADS)
        elif w in WORKLOAD_ALIASES:
            chosen.update(WORKLOAD_ALIASES[w])
        elif w in WORKLOADS:
            chosen.add(w)
        else:
            p.error("unknown workload %r (choose from %s, small, all)" % (w, ",".join(WORKLOADS)))
    opts.workloads = [w for w in WORKLOADS if w in chosen]
    if not opts.workloads:
        p.error("--workloads selects nothing")
    if min(opts.repeat, opts.duration, opts.bulk_mib, opts.hol_mib, opts.hol_max_time,
           opts.setup_conns, opts.watch_repeat, opts.watch_concurrency, opts.tunnels) < 1:
        p.error("--repeat, --duration, --bulk-mib, --hol-mib, --hol-max-time, --setup-conns, "
                "--watch-repeat, --watch-concurrency and --tunnels must be positive")
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


def rotate(names, rep):
    return names[rep % len(names):] + names[:rep % len(names)]


def main(argv=None):
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    tools = ensure_tools(not opts.no_install)
    info = machine_info()
    versions = tool_versions(tools)
    nginx_keys = [k for k in NGINX_WORKLOADS if k in opts.workloads]
    do_watch = "watch" in opts.workloads
    do_tunnels = "tunnels" in opts.workloads
    fd_soft = None
    if do_watch or do_tunnels:
        # Every process started inherits this: one descriptor per watch (or tunnel) in the
        # watchers, the backend, the arc client and agent, sshd and ssh, plus room.
        most = max((max(opts.watches) if do_watch else 0), (opts.tunnels if do_tunnels else 0))
        fd_soft = raise_fd_limit(most + 4096)
        if fd_soft < most + 1024:
            print("bench failed: %d watches or tunnels need an open-file limit of at least %d; "
                  "it is %d (raise the hard limit, or ask for fewer with --watches/--tunnels)"
                  % (most, most + 1024, fd_soft), file=sys.stderr)
            return 2
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
        env = child_environment()
        targets = {}
        sshd = None
        if "ssh" in opts.targets and (nginx_keys or do_watch):
            log("starting sshd on 127.0.0.1:%d" % sshd_port)
            sshd = start_sshd(tools, procs, base, sshd_port)
            notes += sshd["notes"]
        issuer = None
        if "arc-oidc" in opts.targets and (nginx_keys or do_watch):
            log("starting a local OIDC issuer (python -m arc.testing.oidc)")
            issuer = start_oidc_issuer(procs, base, env)
            log("OIDC issuer %s; minted a token for %s" % (issuer["url"], BENCH_USER))
        nginx = None
        if nginx_keys:
            log("starting nginx on 127.0.0.1:%d" % nginx_port)
            nginx, nginx_url = start_nginx(tools, procs, base, nginx_port, ca, ca_key,
                                           opts.bulk_mib << 20, opts.hol_mib << 20)
            if "direct" in opts.targets:
                targets["direct"] = {"url": nginx_url, "roots": [], "names": ("nginx",),
                                     "token": API_TOKEN}
            if sshd is not None:
                log("starting ssh -R 127.0.0.1:%d" % fwd_port)
                s = start_ssh(tools, procs, base, nginx_port, sshd_port, fwd_port, sshd=sshd)
                targets["ssh"] = {"url": s["url"], "roots": s["roots"], "cipher": s["cipher"],
                                  "names": ("ssh", "sshd", "nginx"), "token": API_TOKEN}
            for name, (transport, guard_mode) in ARC_TARGETS.items():
                if name in opts.targets:
                    log("starting %s (relay, agent, client; transport %s, guard %s)"
                        % (name, transport, guard_mode))
                    a = start_arc(tools, procs, base, name, transport, guard_mode, nginx_url,
                                  ca, env, issuer)
                    a["names"] += ("nginx",)
                    targets[name] = a
            for t in targets.values():
                t["nginx_pid"] = nginx.pid
        backend = None
        if do_watch:
            backend = start_watch_backend(procs, base, ca, ca_key, env)
            log("watch backend on 127.0.0.1:%d (control port %d); open-file limit %s"
                % (backend["port"], backend["control"], fd_soft))
        names = [n for n in TARGET_TITLES if n in targets]
        watch_names = [n for n in TARGET_TITLES if n in opts.targets] if do_watch else []

        if "ssh" in targets:
            sshd_tree = tree([targets["ssh"]["roots"][1]])
            log("ssh -R path: ssh pid %d; sshd processes: %s" % (
                targets["ssh"]["roots"][0],
                "; ".join("%d %s" % (pid, proc_name(pid)) for pid in sshd_tree)))

        if names:
            log("warming up every path (1 s of wrk each)")
            for n in names:
                run_wrk(tools, targets[n]["url"], 1, 4, 1, opts.wrk_timeout, targets[n]["token"])

        samples = {n: {} for n in TARGET_TITLES if n in names or n in watch_names}
        flagged = set()
        problems = []
        dead = {}
        for key, title, fn in workloads(opts):
            if key not in nginx_keys:
                continue
            for rep in range(opts.repeat):
                for n in rotate(names, rep):
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

        ctx = {"tools": tools, "procs": procs, "base": base, "env": env, "ca": ca,
               "backend": backend, "sshd": sshd, "issuer": issuer}
        watch_logs = []
        for count in (opts.watches if do_watch else ()):
            key = "watch_%d" % count
            for rep in range(opts.watch_repeat):
                for n in rotate(watch_names, rep):
                    if n in dead:
                        continue
                    log("%-10s %d watches, run %d/%d: opening (at most %.0f s)"
                        % (n, count, rep + 1, opts.watch_repeat, watch_open_timeout(count)))
                    res = run_watch(ctx, n, count, rep, opts)
                    watch_logs += res.get("logs", [])
                    samples[n].setdefault(key, []).append(res)
                    if res.get("error"):
                        flagged.add((n, key))
                        problems.append("%s / %d watches / run %d: %s"
                                        % (n, count, rep + 1, res["error"]))
                    log("%-10s %d watches, run %d/%d: %s"
                        % (n, count, rep + 1, opts.watch_repeat, brief("watch", res)))
        tunnel_samples = []
        if do_tunnels:
            for rep in range(opts.watch_repeat):
                log("relay memory: %d idle agent tunnels (bench/replica_tunnels.py), run %d/%d"
                    % (opts.tunnels, rep + 1, opts.watch_repeat))
                res = run_tunnels(ctx, opts.tunnels, rep)
                tunnel_samples.append(res)
                if res.get("error"):
                    problems.append("tunnels / run %d: %s" % (rep + 1, res["error"]))
                log("tunnels    run %d/%d: %s" % (rep + 1, opts.watch_repeat,
                                                  brief("tunnels", res)))
        tunnels = None
        if tunnel_samples:
            tunnels = medians({"tunnels": tunnel_samples})["tunnels"]
            tunnels["n"] = opts.tunnels

        all_names = list(samples)
        summary = {n: medians(samples[n]) for n in all_names}
        add_latency_deltas(summary)
        cost = guard_cost(summary, names)
        arc_logs = [p for n in names for p in targets[n].get("logs", ())] + watch_logs
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
            "workloads: %s" % ",".join(opts.workloads),
        ]
        if nginx_keys:
            head.append(
                "runs:    %d per figure (medians), wrk %d s per run, bulk %d MiB, HOL download "
                "%d MiB, %d connections per set-up run; nginx TLS on 127.0.0.1, 1 worker, "
                "HTTP/1.1 keep-alive" % (opts.repeat, opts.duration, opts.bulk_mib, opts.hol_mib,
                                         opts.setup_conns))
        if do_watch or do_tunnels:
            what = []
            if do_watch:
                what.append("%s concurrent watches (at most %d opening at once)" % (
                    " and ".join(str(c) for c in opts.watches), opts.watch_concurrency))
            if do_tunnels:
                what.append("%d idle agent tunnels" % opts.tunnels)
            head.append("memory:  %s; %d run(s) per figure (medians); open-file limit %s"
                        % (", ".join(what), opts.watch_repeat, fd_soft))
        if sshd is not None:
            head.append("ssh -R:  default cipher negotiated: %s" % sshd["cipher"])
        tables = []
        if names:
            tables += [figures_rows(summary, names, flagged, nginx_keys),
                       ratio_rows(summary, names, nginx_keys), guard_rows(cost, nginx_keys)]
        if do_watch:
            tables.append(watch_rows(summary, watch_names, opts.watches, flagged))
        if do_watch or do_tunnels:
            tables.append(memory_rows(summary, watch_names, opts.watches if do_watch else [],
                                      tunnels))
        tables = [t for t in tables if t and t[1]]
        legend = []
        if names:
            legend += [
                "CPU (path) = user+system CPU of the processes between the client tool and "
                "nginx: ssh -R: ssh + sshd (with its per-connection children); arc: client + "
                "relay + agent; direct: none.",
                "ratios: arc figure / ssh -R figure (for added p50: arc's added latency / "
                "ssh's).",
                "guard cost: a guard-on target's median minus (or, for rates, divided by) "
                "arc-splice's, where the agent splices bytes without parsing HTTP.",
                "TCP delayed ACKs: host-wide count during one run (median); many of them with a "
                "p99 near 40 ms point to Nagle/delayed-ACK stalls.",
            ]
        if "hol" in nginx_keys:
            legend.append(
                "HOL: wrk -t2 -c%d on the small GET alone, then while %d MiB downloads are "
                "running back to back through the same path (arc: the same client and tunnel); "
                "the ratio is the median of the per-repetition ratios (target: at most 2x)." % (
                    HOL_CONNS, opts.hol_mib))
        if "setup" in nginx_keys:
            legend.append(
                "setup: %d sequential new TCP+TLS connections (no session resumption), one GET "
                "each; time from connect() to the first response byte." % opts.setup_conns)
        if do_watch:
            legend += [
                "watch: one watchers process opens N watches (GET ...pods?watch=true, TLS, at "
                "most %d opening at once) to the watch backend, directly, through a new ssh -R "
                "connection, or through a new arc relay, agent and client configured like the "
                "target (all watches on the client's one tunnel); they stay idle %.0f s, then "
                "the backend sends each one event stamped with its send time; latency = "
                "receipt − stamp." % (opts.watch_concurrency, WATCH_IDLE_S),
                "watch KiB/watch = (RSS with every watch open and idle − RSS before opening) / "
                "watches open, per process; ssh -R: relay row = every sshd process, agent row = "
                "the ssh client. Open CPU: path CPU while opening, per watch; event CPU: path "
                "CPU while the events pass, per event.",
            ]
        if do_watch or do_tunnels:
            legend.append(
                "relay idle memory: per agent tunnel from bench/replica_tunnels.py (RSS growth "
                "of a fresh relay holding N idle agent tunnels, / N); per stream = the relay row "
                "of the watch table. Targets: ≤ %d KiB per idle tunnel, ≤ %d KiB per idle "
                "stream." % (RELAY_KIB_PER_TUNNEL_TARGET, RELAY_KIB_PER_STREAM_TARGET))
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
                        "setup_conns": opts.setup_conns, "quick": opts.quick,
                        "workloads": opts.workloads, "watches": opts.watches,
                        "watch_repeat": opts.watch_repeat,
                        "watch_concurrency": opts.watch_concurrency, "tunnels": opts.tunnels,
                        "fd_limit": fd_soft},
            "targets": {n: {"url": targets[n]["url"],
                            "cipher": targets[n].get("cipher"),
                            "transport": targets[n].get("transport"),
                            "guard": targets[n].get("guard"),
                            "peak_rss_mib": targets[n].get("peak_rss_mib")} for n in names},
            "watch_targets": watch_names,
            "medians": summary, "guard_cost_vs_splice": cost, "audit": audits,
            "relay_tunnels": {"median": tunnels, "samples": tunnel_samples},
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
    if key == "watch":
        mem = ", ".join("%s %.1f KiB/watch" % (part, res[part + "_kib_per_watch"])
                        for part in ("relay", "agent", "client")
                        if res.get(part + "_kib_per_watch") is not None)
        return ("%s/%d opened in %s s, %s got their event, p50 %s ms, p99 %s ms%s%s" % (
            res.get("opened", 0), res["count"], res.get("open_s"), res.get("received", 0),
            "n/a" if res.get("event_p50_ms") is None else "%.1f" % res["event_p50_ms"],
            "n/a" if res.get("event_p99_ms") is None else "%.1f" % res["event_p99_ms"],
            "; " + mem if mem else "",
            "  PROBLEM: " + res["error"] if res.get("error") else ""))
    if key == "tunnels":
        return ("%s tunnels, relay RSS %s -> %s KiB, %s KiB/tunnel%s" % (
            res.get("tunnels"), res.get("relay_rss_idle_kib"), res.get("relay_rss_kib"),
            res.get("per_tunnel_kib"), "  PROBLEM: " + res["error"] if res.get("error") else ""))
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

"""Memory of a relay holding many agent tunnels (docs/scaling.md).

Starts one relay on 127.0.0.1 with N clusters in its registry, opens one
agent tunnel per cluster from this process (the agent's own dialer and
session code, no API server behind), and reports the relay's resident
memory before and after.  Bounded: gives up after 60 s.

    PYTHONPATH=. python bench/replica_tunnels.py [N] [--dir DIR]

DIR (default: a new temporary directory) receives the configurations and logs.
bench/run.py runs it for its "tunnels" workload.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from arc import demo
from arc.testing.procs import Part, free_port, port_in_use, twist, wait_for


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raise_fd_limit(wanted):
    """Room for one descriptor per tunnel in the relay and the dialers (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(n=100, base=None):
    raise_fd_limit(n + 1024)
    if base is None:
        base = tempfile.mkdtemp(prefix="arc-bench-tunnels-")
    os.makedirs(base, exist_ok=True)
    clusters = ["c%d" % i for i in range(1, n)]
    files = demo.prepare(os.path.join(base, "arc"), relay_port=free_port(),
                         client_port=free_port(), extra_clusters=clusters)
    relay = Part("relay", twist("arc-relay", files.relay_config),
                 os.path.join(base, "relay.log")).start()
    try:
        wait_for(lambda: port_in_use(files.relay_port), 20, "the relay", alive=relay)
        time.sleep(1.0)
        idle = rss_kib(relay.pid)
        result = _dial(files, ["demo"] + clusters, relay)
        busy = rss_kib(relay.pid)
        per = (busy - idle) / n
        print(json.dumps({"tunnels": result, "relay_rss_idle_kib": idle,
                          "relay_rss_kib": busy, "per_tunnel_kib": round(per, 1)}))
    finally:
        relay.stop()


def _dial(files, clusters, relay):
    """Open one tunnel per cluster (a child process running the dialers)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_tunnel_fleet.py")
    argv = [sys.executable, script, files.relay_config, files.state_dir,
            str(files.relay_port)] + clusters
    fleet = Part("fleet", argv, os.path.join(os.path.dirname(files.state_dir), "fleet.log"),
                 env=dict(os.environ)).start()
    try:
        import ssl
        import http.client

        def health():
            ctx = ssl.create_default_context(cafile=os.path.join(files.state_dir,
                                                                 "relay-ca.crt"))
            conn = http.client.HTTPSConnection("localhost", files.relay_port, context=ctx,
                                               timeout=5)
            try:
                conn.request("GET", "/healthz")
                return json.loads(conn.getresponse().read())
            finally:
                conn.close()

        wait_for(lambda: health()["agent_tunnels"] == len(clusters), 60,
                 "%d agent tunnels" % len(clusters), alive=fleet)
        time.sleep(2.0)     # a few keepalives
        return health()["agent_tunnels"]
    finally:
        fleet.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=100, help="tunnels (default 100)")
    parser.add_argument("--dir", help="directory for configurations and logs")
    args = parser.parse_args()
    main(args.n, args.dir)

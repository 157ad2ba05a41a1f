"""Runs the demo chain as child processes until Ctrl-C or SIGTERM."""

import os
import signal
import socket
import ssl
import sys
import time

from arc import demo
from arc.testing.procs import Part, port_in_use, start_apiserver, twist, wait_for


def _probe(files, token):
    """One GET /version through the client, as kubectl would send it."""
    ca = os.path.join(files.state_dir, "client-state", "ca.crt")
    request = ("GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
               "Connection: close\r\n\r\n" % token).encode()
    try:
        context = ssl.create_default_context(cafile=ca)
        with socket.create_connection(("127.0.0.1", files.client_port), timeout=5) as raw:
            # The client picks the cluster from the TLS server name.
            with context.wrap_socket(raw, server_hostname="%s.arc.localhost" % demo.CLUSTER) as tls:
                tls.sendall(request)
                return tls.recv(4096).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def run(args):
    state_dir = os.path.abspath(args.state_dir)
    os.makedirs(state_dir, exist_ok=True)
    for port, flag in ((args.relay_port, "--relay-port"), (args.client_port, "--client-port")):
        if port_in_use(port):
            print("port %d on 127.0.0.1 is in use: stop what holds it (an earlier demo?) or "
                  "pass %s PORT" % (port, flag), file=sys.stderr)
            return 2
    parts = []
    stopping = []

    def stop(signum=None, frame=None):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        token_file = os.path.join(state_dir, "api.token")
        upstream = None
        if args.upstream == "embedded":
            with open(token_file, "w") as f:
                f.write(demo.API_TOKEN + "\n")
            # The guard's own identity comes first: it is the emulator kubeconfig's user.
            # Only that identity may impersonate.
            api = start_apiserver(state_dir, tokens=[
                "%s=%s" % (demo.GUARD_TOKEN, demo.GUARD_USER),
                "%s=admin:system:masters" % demo.API_TOKEN],
                extra=["--impersonator", demo.GUARD_USER])
            parts.append(api)
            upstream = api.kubeconfig
            print("API server emulator: %s (log %s)" % (upstream, api.log))
        files = demo.prepare(state_dir, relay_port=args.relay_port, client_port=args.client_port,
                             upstream_kubeconfig=upstream,
                             api_token_file=token_file if upstream else None,
                             transport=args.transport,
                             guard="static" if args.guard == "impersonate" else None)
        for name, plugin, config in (("relay", "arc-relay", files.relay_config),
                                     ("agent", "arc-agent", files.agent_config),
                                     ("client", "arc-client", files.client_config)):
            part = Part(name, twist(plugin, config), os.path.join(state_dir, name + ".log"))
            parts.append(part.start())
            print("%-6s pid %d, config %s, log %s" % (name, part.pid, config, part.log))
        if upstream:
            probe_token = demo.API_TOKEN
            if args.guard == "impersonate":
                with open(files.user_token_file) as f:
                    probe_token = f.read().strip()
            wait_for(lambda: _probe(files, probe_token), 60,
                     "a request to pass through client, relay and agent",
                     alive=parts[-1])
            print("the chain answers: kubectl get pods, exec ticker -- echo hi, logs -f ticker")
        else:
            wait_for(lambda: os.path.exists(files.kubeconfig), 30, "the client's kubeconfig",
                     alive=parts[-1])
            print("the agent uses your current kubeconfig context; the demo kubeconfig has no "
                  "user credentials: add a token to its 'demo' user")
        print("Ctrl-C stops every process of the demo.")
        print("export KUBECONFIG=%s" % files.kubeconfig, flush=True)
        parent = os.getppid()
        while not stopping and os.getppid() == parent:
            for part in parts:
                if not part.running():
                    print("%s exited unexpectedly; last log lines:\n%s"
                          % (part.name, part.tail()), file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    except AssertionError as e:
        print("demo failed to start: %s" % (e,), file=sys.stderr)
        return 1
    finally:
        for part in reversed(parts):
            part.stop()
        print("demo stopped", flush=True)

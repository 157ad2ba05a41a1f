"""``make demo``: the whole chain on loopback, ready for kubectl.

Writes a complete set of files into a state directory (a relay CA and
certificate, random tokens kept only as SHA-256 in the relay's registry,
relay/agent/client YAML), then runs the API server emulator (unless an
existing kubeconfig context was asked for), the relay, the agent and the
client as separate processes.  Prints ``export KUBECONFIG=...`` when kubectl
can be used, and stops every process on Ctrl-C or SIGTERM.

    python -m arc.demo [--state-dir DIR] [--upstream kubeconfig] [--transport websocket]
"""

import argparse
import os
import secrets
import sys
from dataclasses import dataclass

import yaml

from arc import pki
from arc.relay.registry import token_digest

CLUSTER = "demo"
USER = "demo-user"
API_TOKEN = "demo-admin-token"
GUARD_TOKEN = "demo-guard-token"
GUARD_USER = "arc-guard"


@dataclass(frozen=True)
class DemoFiles:
    state_dir: str
    relay_config: str
    agent_config: str
    client_config: str
    kubeconfig: str
    relay_port: int
    client_port: int
    user_token_file: str
    agent_token_file: str


def _write_yaml(path, data, header):
    with open(path, "w", encoding="utf-8") as f:
        f.write(header)
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def _token_file(path):
    if not os.path.exists(path):
        pki.write_private(path, secrets.token_urlsafe(32).encode() + b"\n")
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def prepare(state_dir, *, relay_port=18443, client_port=47011, upstream_kubeconfig=None,
            upstream_context=None, api_token_file=None, transport="tunnel",
            cluster=CLUSTER, extra_clusters=(), tunnel=None, guard=None, audit=None,
            relay_identity=None, bindings=None, user_token_file=None):
    """Write every file the demo chain needs into ``state_dir``.

    ``upstream_kubeconfig`` None means the agent finds its API server the
    usual way ($KUBECONFIG, ~/.kube/config, in-cluster).  ``api_token_file``
    is the bearer token kubectl presents to the API server (passed through).
    ``guard`` is the agent's ``guard:`` section; when it holds an identity
    (impersonation mode) kubectl presents the demo user's token instead.
    ``relay_identity``, ``bindings`` and ``user_token_file`` replace the
    relay's identity providers, access bindings and the user's token (for
    the relay tunnel and, in impersonation mode, for kubectl).
    """
    state_dir = os.path.abspath(state_dir)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    ca_cert = os.path.join(state_dir, "relay-ca.crt")
    relay_cert = os.path.join(state_dir, "relay.crt")
    relay_key = os.path.join(state_dir, "relay.key")
    if not os.path.exists(relay_key):
        ca, ca_key = pki.new_ca("arc demo relay CA")
        cert, key = pki.issue(ca, ca_key, "relay", dns_names=["localhost"],
                              ips=["127.0.0.1", "::1"])
        pki.write_private(ca_cert, ca, 0o644)
        pki.write_private(relay_cert, cert, 0o644)
        pki.write_private(relay_key, key)
    agent_token = os.path.join(state_dir, "agent.token")
    user_token = user_token_file or os.path.join(state_dir, "user.token")
    clusters = [cluster] + list(extra_clusters)
    registry_clusters = {}
    for name in clusters:
        path = agent_token if name == cluster else os.path.join(state_dir, name + "-agent.token")
        registry_clusters[name] = {"agent_token_sha256": token_digest(_token_file(path))}
    tunnel = dict(tunnel or {})
    relay = {
        "listen": "tcp:%d:interface=127.0.0.1" % relay_port,
        "tls": {"cert_file": relay_cert, "key_file": relay_key},
        "clusters": registry_clusters,
        "users": {} if relay_identity else {
            USER: {"token_sha256": token_digest(_token_file(user_token)),
                   "groups": ["demo-team"]}},
        "bindings": bindings or [{"cluster": name, "groups": ["demo-team"]}
                                 for name in clusters],
    }
    if relay_identity:
        relay["identity"] = relay_identity
    if tunnel:
        relay["tunnel"] = tunnel
    relay_url = "https://localhost:%d" % relay_port
    link = {"url": relay_url, "ca_file": ca_cert, "transport": transport}
    agent = {"cluster": cluster, "relay": dict(link, token_file=agent_token)}
    if upstream_kubeconfig:
        agent["upstream"] = {"kubeconfig": upstream_kubeconfig}
        if upstream_context:
            agent["upstream"]["context"] = upstream_context
    if tunnel:
        agent["tunnel"] = tunnel
    if guard == "static":
        # Impersonation mode: the guard accepts the demo user's token itself
        # and the kubeconfig presents that token; the API server sees the
        # guard impersonating demo-user.
        guard = {"identity": {"static": {USER: {
            "token_sha256": token_digest(_token_file(user_token)),
            "groups": ["demo-team"]}}}}
        api_token_file = user_token
    elif guard is not None and "identity" in guard and not guard["identity"].get("passthrough"):
        api_token_file = user_token
    if guard is not None:
        guard = dict(guard)
        guard.setdefault("audit", {"destination": audit or os.path.join(state_dir, "audit.jsonl")})
        agent["guard"] = guard
    kubeconfig = os.path.join(state_dir, "kubeconfig")
    entries = []
    for name in clusters:
        entry = {"name": name}
        if api_token_file:
            entry["token_file"] = api_token_file
        entries.append(entry)
    client = {
        "listen": "tcp:%d:interface=127.0.0.1" % client_port,
        "state_dir": os.path.join(state_dir, "client-state"),
        "relay": dict(link, token_file=user_token),
        "kubeconfig": kubeconfig,
        "set_current_context": True,
        "clusters": entries,
    }
    if tunnel:
        client["tunnel"] = tunnel
    header = "# Written by arc.demo; see etc/ for commented examples.\n"
    return DemoFiles(
        state_dir=state_dir,
        relay_config=_write_yaml(os.path.join(state_dir, "relay.yaml"), relay, header),
        agent_config=_write_yaml(os.path.join(state_dir, "agent.yaml"), agent, header),
        client_config=_write_yaml(os.path.join(state_dir, "client.yaml"), client, header),
        kubeconfig=kubeconfig,
        relay_port=relay_port,
        client_port=client_port,
        user_token_file=user_token,
        agent_token_file=agent_token,
    )


def twistd_command(plugin, config):
    """argv running one part in the foreground, logging to stdout."""
    return [sys.executable, "-m", "twisted", plugin, "--config", config]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m arc.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", default=".demo")
    parser.add_argument("--upstream", choices=["embedded", "kubeconfig"], default="embedded",
                        help="embedded: run the API server emulator; kubeconfig: use the "
                             "current context of $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--transport", choices=["tunnel", "websocket"], default="tunnel")
    parser.add_argument("--guard", choices=["impersonate", "passthrough"], default="impersonate",
                        help="impersonate: the guard authenticates the demo user and impersonates "
                             "it; passthrough: the API server's own token passes through")
    parser.add_argument("--relay-port", type=int, default=18443)
    parser.add_argument("--client-port", type=int, default=47011)
    args = parser.parse_args(argv)
    from arc.demo_runner import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

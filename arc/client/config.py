"""The client proxy's configuration file (see etc/client.yaml)."""

import os
from dataclasses import dataclass
from typing import Optional

from arc import config
from arc.metrics import parse_metrics
from arc.tunnel.session import Limits
from arc.tunnel.settings import RelayLink, parse_limits, parse_relay_link

DEFAULT_LISTEN = "tcp:47011:interface=127.0.0.1"


def default_state_dir(environ=None):
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "arc")


@dataclass(frozen=True)
class ClusterEntry:
    name: str
    context: str
    listen: Optional[str]
    token_file: Optional[str]
    kubeconfig_user: Optional[dict] = None   # written verbatim as the kubeconfig user
    write_kubeconfig: bool = True


@dataclass(frozen=True)
class ClientConfig:
    file: str
    listen: str
    state_dir: str
    relay: RelayLink
    kubeconfig: Optional[str]
    set_current_context: bool
    clusters: tuple
    limits: Limits
    control: Optional[str] = None
    metrics: object = None     # arc.metrics.MetricsSettings, or None
    head_timeout: float = 10.0     # kubectl's TLS handshake and first request head


def load_client_config(path):
    node = config.load(path)
    state = node.get("state_dir", str, None)
    state_dir = os.path.expanduser(state) if state else default_state_dir()
    if not os.path.isabs(state_dir):
        state_dir = os.path.join(node.base, state_dir)
    clusters = []
    names = set()
    for entry in node.list_of_nodes("clusters"):
        name = config.cluster_name(entry, "name", entry.get("name", str))
        if name in names:
            raise entry.error("name", "cluster %r is listed twice" % (name,))
        names.add(name)
        clusters.append(ClusterEntry(
            name=name,
            context=entry.get("context", str, name),
            listen=entry.get("listen", str, None),
            token_file=entry.path("token_file", None),
            kubeconfig_user=_kubeconfig_user(entry),
            write_kubeconfig=entry.get("write_kubeconfig", bool, True),
        ))
        entry.finish()
    if not clusters:
        raise node.error("clusters", "list at least one cluster (- name: CLUSTER)")
    cfg = ClientConfig(
        file=node.file,
        listen=node.get("listen", str, DEFAULT_LISTEN),
        state_dir=state_dir,
        relay=parse_relay_link(node),
        kubeconfig=node.path("kubeconfig", None, must_exist=False),
        set_current_context=node.get("set_current_context", bool, False),
        clusters=tuple(clusters),
        limits=parse_limits(node),
        control=node.get("control", str, None),
        metrics=parse_metrics(node),
        head_timeout=node.positive("head_timeout", float, 10.0),
    )
    node.finish()
    return cfg


def _kubeconfig_user(entry):
    """``kubeconfig_user:``: the kubeconfig user entry for the cluster's context.

    Typically an exec credential plugin (``exec: {command: arc, args: [token]}``).
    """
    user = entry.get("kubeconfig_user", dict, None)
    if user is None:
        return None
    if entry.has("token_file"):
        raise entry.error("kubeconfig_user", "give either token_file or kubeconfig_user")
    exec_entry = user.get("exec")
    if exec_entry is not None and not (isinstance(exec_entry, dict) and exec_entry.get("command")):
        raise entry.error("kubeconfig_user.exec", "an exec credential needs a command")
    return user

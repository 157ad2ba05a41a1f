"""The agent's configuration file (see etc/agent.yaml)."""

from dataclasses import dataclass
from typing import Optional

from arc import config
from arc.guard.guard import GuardConfig, parse_guard
from arc.metrics import parse_metrics
from arc.tunnel.session import Limits
from arc.tunnel.settings import RelayLink, parse_limits, parse_relay_link


@dataclass(frozen=True)
class AgentConfig:
    file: str
    cluster: str
    relay: RelayLink
    kubeconfig: Optional[str]
    context: Optional[str]
    limits: Limits
    connect_timeout: float
    guard: GuardConfig
    metrics: object = None     # arc.metrics.MetricsSettings, or None


def load_agent_config(path):
    node = config.load(path)
    cluster = config.cluster_name(node, "cluster", node.get("cluster", str))
    upstream = node.section("upstream")
    cfg = AgentConfig(
        file=node.file,
        cluster=cluster,
        relay=parse_relay_link(node),
        kubeconfig=upstream.path("kubeconfig", None),
        context=upstream.get("context", str, None),
        limits=parse_limits(node),
        connect_timeout=upstream.positive("connect_timeout", float, 10.0),
        guard=parse_guard(node),
        metrics=parse_metrics(node),
    )
    upstream.finish()
    node.finish()
    return cfg

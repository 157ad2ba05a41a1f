"""twistd plugins of arc: arc-relay, arc-agent, arc-client, arc-guard.

Kept light: the real work is imported only when a plugin is used.
"""

from twisted.application.service import ServiceMaker

arc_relay = ServiceMaker("arc relay", "arc.relay.tap",
                         "Relay: accepts agent and client tunnels, pairs streams", "arc-relay")
arc_agent = ServiceMaker("arc agent", "arc.agent.tap",
                         "Cluster agent: keeps an outbound tunnel to the relay", "arc-agent")
arc_client = ServiceMaker("arc client", "arc.client.tap",
                          "Client proxy: serves kubectl locally over the tunnel", "arc-client")
arc_guard = ServiceMaker("arc guard", "arc.guard.tap",
                         "Guard: authenticating, impersonating proxy for kube-apiserver",
                         "arc-guard")

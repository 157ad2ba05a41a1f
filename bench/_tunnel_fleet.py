"""Child of bench/replica_tunnels.py: one agent tunnel per cluster named in argv."""

import os
import sys

from twisted.internet import reactor

from arc.relay.relay import AGENT_PATH
from arc.tls import client_options
from arc.tunnel.dial import TunnelDialer
from arc.tunnel.session import Limits, Session


def main(relay_config, state_dir, port, *clusters):
    with open(os.path.join(state_dir, "relay-ca.crt"), "rb") as f:
        tls = client_options("localhost", ca_pem=f.read())
    for cluster in clusters:
        name = "agent.token" if cluster == "demo" else cluster + "-agent.token"
        path = os.path.join(state_dir, name)
        TunnelDialer(
            reactor, relay_url="https://localhost:%s" % port, path=AGENT_PATH,
            credential=lambda path=path: open(path).read().strip(),
            make_session=lambda: Session(dialer=True, clock=reactor, limits=Limits(),
                                         name="relay"),
            tls_options=tls, extra_headers={"Arc-Cluster": cluster},
            addresses=["127.0.0.1"]).startService()
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])

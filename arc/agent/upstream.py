"""Connections from the agent to kube-apiserver.

In this mode the caller's own bearer token travels inside the stream and the
API server judges it (the "service-account token" mode of Azure's proxy).
The agent therefore presents NO credential of its own upstream: a client
certificate would let the API server authenticate the request as the agent.
"""

from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger

from arc.tls import HTTP11, client_options


class Upstream:
    log = Logger()

    def __init__(self, reactor, target, timeout=10.0):
        self.reactor = reactor
        self.target = target
        self.timeout = timeout
        if target.insecure_skip_tls_verify:
            self.log.warn("upstream {server}: insecure-skip-tls-verify is set; the API "
                          "server's certificate is NOT checked", server=target.server)
            self.tls = ssl.CertificateOptions(verify=False, acceptableProtocols=list(HTTP11))
        else:
            self.tls = client_options(target.tls_server_name or target.host,
                                      ca_pem=target.ca_pem)

    def describe(self):
        return self.target.server

    def connect(self, factory):
        endpoint = HostnameEndpoint(self.reactor, self.target.host, self.target.port,
                                    timeout=self.timeout)
        return wrapClientTLS(self.tls, endpoint).connect(factory)

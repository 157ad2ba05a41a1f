"""Connections to kube-apiserver, with or without the guard's credentials.

Two kinds of connection are made:

- *passthrough*: the caller's own bearer token travels in the request and
  the API server judges it.  The connection carries NO credential of the
  guard's — a client certificate here would let the API server
  authenticate the request as the guard.
- *guard*: the request carries impersonation headers, and the guard proves
  its own identity with a client certificate (TLS) or a bearer token (a
  service-account token file, re-read periodically so rotation works).
"""

from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from arc.errors import ConfigError
from arc.tls import client_options, insecure_client_options
from arc.tlssocket import TLSClientEndpoint

GUARD = "guard"
PASSTHROUGH = "passthrough"


class APIServer:
    log = Logger()

    def __init__(self, reactor, target, timeout=10.0):
        self.reactor = reactor
        self.target = target
        self.timeout = timeout
        self._token = target.token
        if target.insecure_skip_tls_verify:
            self.log.warn("upstream {server}: insecure-skip-tls-verify is set; the API "
                          "server's certificate is NOT checked", server=target.server)
            self._plain = insecure_client_options()
            self._guard = self._plain
        else:
            name = target.tls_server_name or target.host
            self._plain = client_options(name, ca_pem=target.ca_pem)
            self._guard = self._plain
            if target.client_cert_pem and target.client_key_pem:
                self._guard = client_options(name, ca_pem=target.ca_pem,
                                             client_cert_pem=target.client_cert_pem,
                                             client_key_pem=target.client_key_pem)
        self.refresh_token()

    @property
    def has_credentials(self):
        return bool(self._token) or self._guard is not self._plain

    def refresh_token(self):
        """Re-read the token file (service-account tokens rotate)."""
        if self.target.token_file:
            try:
                token = self.target.bearer_token()
            except (OSError, ConfigError) as e:
                # Keep the last good token: a rotation writes a new file, never none.
                self.log.error("cannot read the guard's token file {path}: {error}",
                               path=self.target.token_file, error=str(e))
                return
            if token:
                self._token = token

    def credential_headers(self):
        if self._token and self._guard is self._plain:
            return [["Authorization", "Bearer " + self._token]]
        return []

    def describe(self):
        return self.target.server

    def connect(self, mode, factory):
        endpoint = HostnameEndpoint(self.reactor, self.target.host, self.target.port,
                                    timeout=self.timeout)
        tls = self._guard if mode == GUARD else self._plain
        return TLSClientEndpoint(tls, endpoint).connect(factory)

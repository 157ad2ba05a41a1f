"""TLS options for every listener and dialer of arc.

Servers always set ALPN (``acceptableProtocols``): with Twisted 26 and
pyOpenSSL 26 a server context without it aborts the handshake as soon as the
client offers ALPN, which curl and kubectl always do.  Offer only what is
served: ``http/1.1``.  Dialers check the peer's name with service_identity,
as ``optionsForClientTLS`` does; :class:`ClientTLS` serves both TLS
implementations (:mod:`arc.tlssocket` on a socket, Twisted's otherwise).
"""

from OpenSSL import SSL
from service_identity import pyopenssl as _identity
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from arc.errors import ConfigError
from arc.tlssocket import whole_writes

HTTP11 = (b"http/1.1",)


def _read(path, what, file=None, key=None):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError("cannot read %s %s: %s" % (what, path, e.strerror),
                          file=file, key=key) from None


def server_options(cert_pem, key_pem, *, protocols=HTTP11, file=None, key=None):
    """CertificateOptions for a listener from a PEM chain and key."""
    try:
        private = ssl.PrivateCertificate.loadPEM(key_pem + b"\n" + cert_pem)
        chain = _chain(cert_pem)
    except Exception as e:
        raise ConfigError("not a usable PEM certificate and key: %s" % (e,),
                          file=file, key=key) from None
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=[c.original for c in chain[1:]],
        acceptableProtocols=list(protocols),
    )


def server_options_from_files(cert_path, key_path, *, file=None, key="tls"):
    return server_options(_read(cert_path, "certificate", file, key + ".cert"),
                          _read(key_path, "private key", file, key + ".key"),
                          file=file, key=key)


def _chain(pem):
    marker = b"-----END CERTIFICATE-----"
    parts = [p + marker for p in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in p]
    return [ssl.Certificate.loadPEM(p) for p in parts]


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """How to dial one server over TLS: trust, client certificate, ALPN, name.

    Twisted's TLS uses it as an ``IOpenSSLClientConnectionCreator`` (treq,
    connections that are not plain sockets); :mod:`arc.tlssocket` asks it
    for a connection on a socket (:meth:`socket_connection`) and for the
    check of the peer once the handshake is done (:meth:`check`).  Both
    verify the same way: the chain against the trust roots, then the name
    (DNS name, or IP address) with service_identity.  ``server_name`` None
    verifies nothing (``insecure-skip-tls-verify``).
    """

    # The last resumable session with this server: a new connection offers
    # it, so that the server can skip its certificate and signature.
    _session = None

    def __init__(self, server_name, options, twisted_creator, protocols=HTTP11):
        self.server_name = server_name
        self.protocols = list(protocols)
        self._context = whole_writes(options.getContext())
        self._twisted = twisted_creator
        self._ip = bool(server_name) and (isIPAddress(server_name)
                                         or isIPv6Address(server_name))

    def clientConnectionForTLS(self, tlsProtocol):
        return self._twisted.clientConnectionForTLS(tlsProtocol)

    def socket_connection(self, sock):
        connection = SSL.Connection(self._context, sock)
        if self.server_name and not self._ip:
            connection.set_tlsext_host_name(self.server_name.encode("idna"))
        if self.protocols:
            connection.set_alpn_protos(self.protocols)
        if self._session is not None:
            connection.set_session(self._session)
        connection.set_connect_state()
        return connection

    def remember(self, connection):
        """Keep ``connection``'s session for the next connection (its first data has arrived)."""
        session = connection.get_session()
        if session is not None:
            self._session = session

    def check(self, connection):
        """Raise ``service_identity.VerificationError`` unless the peer has our name."""
        if not self.server_name:
            return
        if self._ip:
            _identity.verify_ip_address(connection, self.server_name)
        else:
            _identity.verify_hostname(connection, self.server_name)


def client_options(server_name, *, ca_pem=None, client_cert_pem=None, client_key_pem=None,
                   protocols=HTTP11):
    """Options for dialing ``server_name`` (checked with service_identity).

    ``ca_pem`` None means the platform's trust store.
    """
    if ca_pem is not None:
        roots = _chain(ca_pem)
        if not roots:
            raise ConfigError("CA bundle holds no PEM certificate")
        trust = ssl.trustRootFromCertificates(roots)
    else:
        trust = ssl.platformTrust()
    client_cert = None
    if client_cert_pem and client_key_pem:
        client_cert = ssl.PrivateCertificate.loadPEM(client_key_pem + b"\n" + client_cert_pem)
    twisted_creator = ssl.optionsForClientTLS(server_name, trustRoot=trust,
                                              clientCertificate=client_cert,
                                              acceptableProtocols=list(protocols))
    extra = {}
    if client_cert is not None:
        extra = {"privateKey": client_cert.privateKey.original,
                 "certificate": client_cert.original}
    options = ssl.CertificateOptions(trustRoot=trust, acceptableProtocols=list(protocols),
                                     **extra)
    return ClientTLS(server_name, options, twisted_creator, protocols)


def insecure_client_options(protocols=HTTP11):
    """Options that check nothing about the server (``insecure-skip-tls-verify``)."""
    options = ssl.CertificateOptions(verify=False, acceptableProtocols=list(protocols))
    return ClientTLS(None, options, _ContextCreator(options), protocols)


@implementer(IOpenSSLClientConnectionCreator)
class _ContextCreator:
    def __init__(self, options):
        self.options = options

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self.options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        return connection


def set_nodelay(transport):
    """TCP_NODELAY on ``transport`` or the TCP transport under its TLS layer."""
    while transport is not None:
        setter = getattr(type(transport), "setTcpNoDelay", None)
        if setter is not None:
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass
            return
        transport = getattr(transport, "transport", None)


def pending_write_bytes(transport):
    """Bytes a socket transport (under any TLS layer) still has to write."""
    while transport is not None and not hasattr(transport, "_tempDataLen"):
        transport = getattr(transport, "transport", None)
    if transport is None:
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def is_tls_failure(exc):
    """True for a failed handshake or certificate check (name, trust)."""
    from OpenSSL.SSL import Error as SSLError
    from service_identity import VerificationError
    return isinstance(exc, (SSLError, VerificationError))

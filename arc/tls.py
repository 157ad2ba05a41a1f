"""TLS options for every listener and dialer of arc.

Servers always set ALPN (``acceptableProtocols``): with Twisted 26 and
pyOpenSSL 26 a server context without it aborts the handshake as soon as the
client offers ALPN, which curl and kubectl always do.  Offer only what is
served: ``http/1.1``.  Dialers check the peer's name with service_identity
(``optionsForClientTLS``).
"""

from twisted.internet import ssl

from arc.errors import ConfigError

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
    return ssl.optionsForClientTLS(server_name, trustRoot=trust,
                                   clientCertificate=client_cert,
                                   acceptableProtocols=list(protocols))


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
    while transport is not None and "dataBuffer" not in vars(transport):
        transport = getattr(transport, "transport", None)
    if transport is None:
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def is_tls_failure(exc):
    """True for a failed handshake or certificate check (name, trust)."""
    from OpenSSL.SSL import Error as SSLError
    from service_identity import VerificationError
    return isinstance(exc, (SSLError, VerificationError))

"""The local certificate authority behind the client proxy's TLS listener.

kubectl reaches the client proxy over TLS on 127.0.0.1. Each kubeconfig
context arc writes embeds this CA's certificate and sets ``tls-server-name``
to ``CLUSTER.arc.localhost``; the proxy reads that SNI name to choose the
cluster. The CA is created once and then kept, since kubeconfigs depend on
it; the serving certificate it signs is renewed whenever needed.
"""

import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import CertificateOptions

from arc import pki
from arc.errors import ConfigError

SERVER_NAME_SUFFIX = "arc.localhost"
CA_LIFETIME = timedelta(days=3650)
SERVER_LIFETIME = timedelta(days=365)
RENEW_WITHIN = timedelta(days=30)
# Certificates start a little in the past, for clocks that run slightly behind.
_BACKDATE = timedelta(hours=1)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class LocalCA:
    """The local CA certificate and the serving certificate and key it issued.

    ``ca_path`` is the CA certificate's file. The repr shows only that path.
    """

    ca_cert_pem: bytes = field(repr=False)
    server_cert_pem: bytes = field(repr=False)
    server_key_pem: bytes = field(repr=False)
    ca_path: str

    def server_name(self, cluster):
        """The TLS server name kubectl sends to reach ``cluster`` through the proxy."""
        if not isinstance(cluster, str) or not _DNS_LABEL.fullmatch(cluster):
            raise ConfigError(
                f"{cluster!r} is not a valid cluster name: it must be a DNS-1123 label "
                "(at most 63 lower-case letters, digits and '-', starting and ending with a "
                "letter or digit); rename the cluster, for example to 'prod-eu-1'",
                key="cluster")
        return f"{cluster}.{SERVER_NAME_SUFFIX}"

    def tls_options(self, acceptable_protocols=(b"http/1.1",)):
        """Twisted TLS options for the local listener, serving the certificate.

        ALPN is always negotiated: with Twisted 26.10 and pyOpenSSL 26.4 a
        server context without ALPN protocols aborts the handshake when the
        client offers ALPN, as kubectl and curl do. Offer only protocols the
        listener speaks (kubectl switches to HTTP/2 when ``h2`` is offered).
        Any SNI name is accepted; the listener reads it from the connection
        (``transport.getHandle().get_servername()``).
        """
        if not acceptable_protocols:
            raise ValueError("acceptable_protocols must name at least one protocol: "
                             "a TLS listener without ALPN fails clients that offer it")
        # cryptography objects: pyOpenSSL 26 deprecates its own X509 and PKey.
        return CertificateOptions(
            privateKey=serialization.load_pem_private_key(self.server_key_pem, password=None),
            certificate=x509.load_pem_x509_certificate(self.server_cert_pem),
            acceptableProtocols=list(acceptable_protocols),
        )


def ensure_local_ca(state_dir, *, now=None):
    """Load or create the local CA and its serving certificate in ``state_dir``.

    Files: ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``, all 0600,
    in a directory created 0700. An existing CA is reused (it is replaced
    only once expired); the serving certificate is reissued when missing,
    unreadable, not issued by the CA, or within 30 days of expiry. ``now``
    (an aware datetime) stands in for the current time.
    """
    now = datetime.now(timezone.utc) if now is None else now
    state_dir = os.fspath(state_dir)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the directory: {e.strerror}; choose another "
                          "state directory or fix its parent's permissions",
                          file=state_dir) from None
    ca_cert, ca_key, ca_cert_pem = _ensure_ca(state_dir, now)
    server_cert_pem, server_key_pem = _ensure_server_certificate(state_dir, ca_cert, ca_key, now)
    return LocalCA(ca_cert_pem=ca_cert_pem, server_cert_pem=server_cert_pem,
                   server_key_pem=server_key_pem, ca_path=os.path.join(state_dir, "ca.crt"))


def _ensure_ca(state_dir, now):
    """The CA certificate, its key and the certificate's PEM, loaded or created."""
    cert_path = os.path.join(state_dir, "ca.crt")
    key_path = os.path.join(state_dir, "ca.key")
    if not os.path.exists(cert_path):
        return _create_ca(cert_path, key_path, now)
    fix = (f"delete {cert_path} and {key_path} to create a new CA, then add the arc "
           "kubeconfig contexts again")
    if not os.path.exists(key_path):
        raise ConfigError(f"the CA key {key_path} is missing; restore it, or {fix}",
                          file=cert_path)
    mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if mode & 0o077:
        raise ConfigError(f"the CA private key is open to other users (mode {mode:04o}); "
                          f"run `chmod 600 {key_path}`", file=key_path)
    cert_pem = _read(cert_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"the local CA cannot be loaded; {fix}", file=cert_path) from None
    if not _same_public_key(cert, key):
        raise ConfigError(f"ca.key is not the key of ca.crt; {fix}", file=cert_path)
    if cert.not_valid_after_utc <= now:
        return _create_ca(cert_path, key_path, now)
    return cert, key, cert_pem


def _create_ca(cert_path, key_path, now):
    key = ec.generate_private_key(ec.SECP256R1())
    # A common name is at most 64 characters; host names can be longer.
    common_name = f"arc local CA {socket.gethostname()}"[:64]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _certificate_builder(name, name, key.public_key(), now, CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    # The key first: a certificate on disk means the CA is complete.
    _write_private(key_path, _private_pem(key))
    _write_private(cert_path, cert_pem)
    return cert, key, cert_pem


def _ensure_server_certificate(state_dir, ca_cert, ca_key, now):
    """The serving certificate and key PEMs: reused while good, else issued anew."""
    cert_path = os.path.join(state_dir, "server.crt")
    key_path = os.path.join(state_dir, "server.key")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        cert_pem, key_pem = _read(cert_path), _read(key_path)
        if _server_certificate_usable(cert_pem, key_pem, ca_cert, now):
            return cert_pem, key_pem
    key = ec.generate_private_key(ec.SECP256R1())
    names = [
        x509.DNSName(f"*.{SERVER_NAME_SUFFIX}"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "arc local proxy")])
    cert = (
        _certificate_builder(subject, ca_cert.subject, key.public_key(), now, SERVER_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem, key_pem = cert.public_bytes(serialization.Encoding.PEM), _private_pem(key)
    _write_private(key_path, key_pem)
    _write_private(cert_path, cert_pem)
    return cert_pem, key_pem


def _server_certificate_usable(cert_pem, key_pem, ca_cert, now):
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature):
        return False
    return _same_public_key(cert, key) and cert.not_valid_after_utc - now > RENEW_WITHIN


def _certificate_builder(subject, issuer, public_key, now, lifetime):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
    )


def _key_usage(**allowed):
    usages = ["digital_signature", "content_commitment", "key_encipherment",
              "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
              "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{usage: allowed.get(usage, False) for usage in usages})


def _same_public_key(cert, key):
    def spki(public_key):
        return public_key.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)

    return spki(cert.public_key()) == spki(key.public_key())


def _private_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}; fix the file's permissions",
                          file=path) from None


def _write_private(path, data):
    """Write ``data`` with mode 0600 atomically (temporary file, fsync, rename)."""
    try:
        pki.write_private(path, data)
    except OSError as e:
        raise ConfigError(f"cannot write: {e.strerror}; fix the permissions of "
                          f"{os.path.dirname(path)}", file=path) from None

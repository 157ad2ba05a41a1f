"""TLS material and the kubeconfig of the API server emulator.

kubectl only sends bearer tokens over HTTPS, so the emulator keeps, in its
state directory, a self-signed CA and a serving certificate for 127.0.0.1,
::1 and localhost, created on first start.  The kubeconfig written beside
them trusts that CA and carries a token, so kubectl can use it unchanged.
"""

import datetime
import ipaddress
import os
from base64 import b64encode

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import CertificateOptions

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
KUBECONFIG = "kubeconfig"
CONTEXT = "emulator"

_VALIDITY = datetime.timedelta(days=3650)


class Credentials:
    """The CA certificate and the serving key pair, as PEM bytes."""

    def __init__(self, caCert, serverCert, serverKey):
        self.caCert = caCert
        self.serverCert = serverCert
        self.serverKey = serverKey

    def serverOptions(self):
        """TLS options for the listener: HTTP/1.1 only, announced over ALPN.

        Offering no ALPN protocol at all makes the handshake fail as soon as
        the client offers ALPN (kubectl and curl always do); offering ``h2``
        would make kubectl speak HTTP/2, which the emulator does not serve.
        """
        return CertificateOptions(
            privateKey=serialization.load_pem_private_key(self.serverKey, None),
            certificate=x509.load_pem_x509_certificate(self.serverCert),
            acceptableProtocols=[b"http/1.1"],
        )


def ensureCredentials(stateDir):
    """Load the credentials in C{stateDir}, creating them on first use.

    @param stateDir: a L{twisted.python.filepath.FilePath} directory.
    """
    stateDir.makedirs(ignoreExistingDirectory=True)
    paths = [stateDir.child(name) for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    if not all(p.exists() for p in paths):
        for path, content in zip(paths, _createCredentials()):
            _writePrivate(path, content)
    caCert, _, serverCert, serverKey = (p.getContent() for p in paths)
    return Credentials(caCert, serverCert, serverKey)


def _createCredentials():
    """New ``(ca.crt, ca.key, server.crt, server.key)`` PEM contents."""
    now = datetime.datetime.now(datetime.timezone.utc)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "arc API server emulator CA")])
    ca = (
        _builder(caName, caName, caKey.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(caKey, hashes.SHA256())
    )
    serverKey = ec.generate_private_key(ec.SECP256R1())
    serverName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "arc-apiserver-emulator")])
    san = x509.SubjectAlternativeName(
        [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
            x509.DNSName("localhost"),
        ]
    )
    server = (
        _builder(serverName, caName, serverKey.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(caKey, hashes.SHA256())
    )
    return (_certPEM(ca), _keyPEM(caKey), _certPEM(server), _keyPEM(serverKey))


def _builder(subject, issuer, publicKey, now):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
    )


def _certPEM(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _keyPEM(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _writePrivate(path, content):
    """Write C{content} to C{path}, readable by its owner only."""
    fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    os.chmod(path.path, 0o600)


def writeKubeconfig(stateDir, caCert, server, token):
    """Write C{stateDir}/kubeconfig for C{server} and return its path.

    @param caCert: the CA certificate kubectl must trust (PEM bytes).
    @param server: the URL, e.g. ``https://127.0.0.1:6443``.
    @param token: the bearer token the kubeconfig's user presents.
    """
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CONTEXT,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": b64encode(caCert).decode("ascii"),
                },
            }
        ],
        "users": [{"name": CONTEXT, "user": {"token": token}}],
        "contexts": [
            {
                "name": CONTEXT,
                "context": {"cluster": CONTEXT, "user": CONTEXT, "namespace": "default"},
            }
        ],
        "current-context": CONTEXT,
        "preferences": {},
    }
    path = stateDir.child(KUBECONFIG)
    _writePrivate(path, yaml.safe_dump(config, sort_keys=False).encode("utf-8"))
    return path

"""Tests for arc.client.localca: the CA and certificate behind the local TLS listener."""

import ipaddress
import os
import shutil
import socket
import stat
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from arc.client.localca import ensure_local_ca
from arc.errors import ConfigError

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def certificate(pem):
    return x509.load_pem_x509_certificate(pem)


class EnsureLocalCATests(TestCase):
    """Creating, reusing and renewing the CA and serving certificate."""

    def setUp(self):
        self.state_dir = os.path.join(os.path.abspath(self.mktemp()), "state")

    def path(self, name):
        return os.path.join(self.state_dir, name)

    def test_creates_private_files(self):
        local_ca = ensure_local_ca(self.state_dir, now=NOW)
        self.assertEqual(mode(self.state_dir), 0o700)
        self.assertEqual(sorted(os.listdir(self.state_dir)),
                         ["ca.crt", "ca.key", "server.crt", "server.key"])
        for name in ("ca.key", "server.key", "ca.crt", "server.crt"):
            self.assertEqual(mode(self.path(name)), 0o600, name)
        self.assertEqual(local_ca.ca_path, self.path("ca.crt"))
        with open(local_ca.ca_path, "rb") as f:
            self.assertEqual(f.read(), local_ca.ca_cert_pem)

    def test_ca_certificate(self):
        ca = certificate(ensure_local_ca(self.state_dir, now=NOW).ca_cert_pem)
        self.assertEqual(ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
                         f"arc local CA {socket.gethostname()}"[:64])
        self.assertEqual(ca.issuer, ca.subject)
        self.assertIsInstance(ca.public_key().curve, ec.SECP256R1)
        self.assertEqual(ca.not_valid_after_utc, NOW + timedelta(days=3650))
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertEqual((constraints.value.ca, constraints.value.path_length), (True, 0))
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.key_cert_sign and usage.value.crl_sign)
        self.assertFalse(usage.value.digital_signature)

    def test_server_certificate(self):
        local_ca = ensure_local_ca(self.state_dir, now=NOW)
        server = certificate(local_ca.server_cert_pem)
        server.verify_directly_issued_by(certificate(local_ca.ca_cert_pem))
        self.assertEqual(server.not_valid_after_utc, NOW + timedelta(days=365))
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName),
                         ["*.arc.localhost", "localhost"])
        self.assertEqual(names.get_values_for_type(x509.IPAddress),
                         [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")])
        usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertFalse(server.extensions.get_extension_for_class(
            x509.BasicConstraints).value.ca)

    def test_second_call_reuses_everything(self):
        first = ensure_local_ca(self.state_dir, now=NOW)
        second = ensure_local_ca(self.state_dir, now=NOW + timedelta(days=300))
        self.assertEqual(second, first)

    def test_server_certificate_renewed_near_expiry(self):
        first = ensure_local_ca(self.state_dir, now=NOW)
        later = NOW + timedelta(days=340)
        second = ensure_local_ca(self.state_dir, now=later)
        self.assertEqual(second.ca_cert_pem, first.ca_cert_pem)
        self.assertNotEqual(second.server_cert_pem, first.server_cert_pem)
        self.assertNotEqual(second.server_key_pem, first.server_key_pem)
        self.assertEqual(certificate(second.server_cert_pem).not_valid_after_utc,
                         later + timedelta(days=365))
        with open(self.path("server.crt"), "rb") as f:
            self.assertEqual(f.read(), second.server_cert_pem)

    def test_server_certificate_from_another_ca_replaced(self):
        ours = ensure_local_ca(self.state_dir, now=NOW)
        other_dir = os.path.abspath(self.mktemp())
        other = ensure_local_ca(other_dir, now=NOW)
        for name in ("server.crt", "server.key"):
            shutil.copy(os.path.join(other_dir, name), self.path(name))
        again = ensure_local_ca(self.state_dir, now=NOW)
        self.assertEqual(again.ca_cert_pem, ours.ca_cert_pem)
        self.assertNotEqual(again.server_cert_pem, other.server_cert_pem)
        certificate(again.server_cert_pem).verify_directly_issued_by(
            certificate(ours.ca_cert_pem))

    def test_server_files_missing_or_mismatched(self):
        first = ensure_local_ca(self.state_dir, now=NOW)
        os.remove(self.path("server.key"))
        second = ensure_local_ca(self.state_dir, now=NOW)
        self.assertNotEqual(second.server_key_pem, first.server_key_pem)
        # A key that is not the certificate's (as after an interrupted renewal).
        with open(self.path("server.key"), "wb") as f:
            f.write(first.server_key_pem)
        third = ensure_local_ca(self.state_dir, now=NOW)
        self.assertNotIn(third.server_cert_pem, (first.server_cert_pem, second.server_cert_pem))
        self.assertEqual(third.ca_cert_pem, first.ca_cert_pem)

    def test_expired_ca_replaced(self):
        first = ensure_local_ca(self.state_dir, now=NOW)
        later = NOW + timedelta(days=3651)
        second = ensure_local_ca(self.state_dir, now=later)
        self.assertNotEqual(second.ca_cert_pem, first.ca_cert_pem)
        certificate(second.server_cert_pem).verify_directly_issued_by(
            certificate(second.ca_cert_pem))

    def test_ca_key_open_to_others(self):
        ensure_local_ca(self.state_dir, now=NOW)
        os.chmod(self.path("ca.key"), 0o640)
        error = self.assertRaises(ConfigError, ensure_local_ca, self.state_dir, now=NOW)
        self.assertEqual(error.file, self.path("ca.key"))
        self.assertIn(f"`chmod 600 {self.path('ca.key')}`", str(error))

    def test_ca_key_missing(self):
        first = ensure_local_ca(self.state_dir, now=NOW)
        os.remove(self.path("ca.key"))
        error = self.assertRaises(ConfigError, ensure_local_ca, self.state_dir, now=NOW)
        self.assertIn("is missing; restore it", str(error))
        with open(self.path("ca.crt"), "rb") as f:
            self.assertEqual(f.read(), first.ca_cert_pem)

    def test_ca_unreadable_is_not_replaced(self):
        ensure_local_ca(self.state_dir, now=NOW)
        with open(self.path("ca.crt"), "wb") as f:
            f.write(b"garbage")
        error = self.assertRaises(ConfigError, ensure_local_ca, self.state_dir, now=NOW)
        self.assertIn("cannot be loaded", str(error))
        self.assertIn(f"delete {self.path('ca.crt')} and {self.path('ca.key')}", str(error))

    def test_ca_key_of_another_ca(self):
        ensure_local_ca(self.state_dir, now=NOW)
        other_dir = os.path.abspath(self.mktemp())
        ensure_local_ca(other_dir, now=NOW)
        shutil.copy(os.path.join(other_dir, "ca.key"), self.path("ca.key"))
        error = self.assertRaises(ConfigError, ensure_local_ca, self.state_dir, now=NOW)
        self.assertIn("ca.key is not the key of ca.crt", str(error))

    def test_server_name(self):
        local_ca = ensure_local_ca(self.state_dir)
        self.assertEqual(local_ca.server_name("demo"), "demo.arc.localhost")
        self.assertEqual(local_ca.server_name("a" * 63), "a" * 63 + ".arc.localhost")
        for bad in ["", "Demo", "-demo", "demo-", "de.mo", "de_mo", "a" * 64, "demo\n", None]:
            error = self.assertRaises(ConfigError, local_ca.server_name, bad)
            self.assertIn("DNS-1123 label", str(error))

    def test_repr_hides_key(self):
        local_ca = ensure_local_ca(self.state_dir)
        self.assertNotIn("PRIVATE KEY", repr(local_ca))
        self.assertIn(local_ca.ca_path, repr(local_ca))


@implementer(IHandshakeListener)
class HandshakeRecorder(Protocol):
    """Records how a TLS handshake went, as seen from one side."""

    completed = False
    server_name = None
    protocol = None
    lost_reason = None

    def handshakeCompleted(self):
        self.completed = True
        self.server_name = self.transport.getHandle().get_servername()
        self.protocol = self.transport.negotiatedProtocol

    def connectionLost(self, reason):
        self.lost_reason = reason


class TLSHandshakeTests(TestCase):
    """A real TLS handshake, in memory, between the listener's options and a client."""

    def setUp(self):
        self.local_ca = ensure_local_ca(os.path.abspath(self.mktemp()))

    def handshake(self, server_options, hostname, ca_pem, protocols=(b"h2", b"http/1.1")):
        client_options = optionsForClientTLS(hostname, Certificate.loadPEM(ca_pem),
                                             acceptableProtocols=list(protocols))
        server, client = HandshakeRecorder(), HandshakeRecorder()
        server_factory = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(
            lambda: server))
        client_factory = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(
            lambda: client))
        connectedServerAndClient(lambda: server_factory.buildProtocol(None),
                                 lambda: client_factory.buildProtocol(None))
        return server, client

    def test_handshake_with_alpn_and_sni(self):
        server, client = self.handshake(self.local_ca.tls_options(), "demo.arc.localhost",
                                        self.local_ca.ca_cert_pem)
        self.assertIsNone(client.lost_reason)
        self.assertTrue(client.completed)
        self.assertTrue(server.completed)
        self.assertEqual(server.server_name, b"demo.arc.localhost")
        self.assertEqual((server.protocol, client.protocol), (b"http/1.1", b"http/1.1"))

    def test_handshake_offering_h2(self):
        options = self.local_ca.tls_options(acceptable_protocols=(b"h2", b"http/1.1"))
        server, client = self.handshake(options, "other.arc.localhost",
                                        self.local_ca.ca_cert_pem)
        self.assertEqual((server.server_name, client.protocol),
                         (b"other.arc.localhost", b"h2"))

    def test_client_trusting_another_ca_fails(self):
        other = ensure_local_ca(os.path.abspath(self.mktemp()))
        server, client = self.handshake(self.local_ca.tls_options(), "demo.arc.localhost",
                                        other.ca_cert_pem)
        self.assertFalse(client.completed)
        self.assertTrue(client.lost_reason.check(SSL.Error))
        self.assertIn("certificate verify failed", str(client.lost_reason.value))

    def test_name_outside_the_certificate_fails(self):
        server, client = self.handshake(self.local_ca.tls_options(), "demo.example.com",
                                        self.local_ca.ca_cert_pem)
        self.assertFalse(client.completed)
        self.assertTrue(client.lost_reason.check(VerificationError))

    def test_no_alpn_protocols_refused(self):
        self.assertRaises(ValueError, self.local_ca.tls_options, acceptable_protocols=())

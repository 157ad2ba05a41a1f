"""The guard's own credentials towards kube-apiserver."""

import os

from twisted.internet import defer, reactor, ssl
from twisted.internet.interfaces import IReactorPluggableNameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from arc import pki
from arc.guard.upstream import GUARD, PASSTHROUGH, APIServer
from arc.kube.kubeconfig import Upstream as Target


class TokenFileTests(unittest.TestCase):
    def test_rotated_token_file_is_picked_up(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("first-token\n")
        target = Target(server="https://127.0.0.1:6443", host="127.0.0.1", port=6443,
                        token_file=path)
        api = APIServer(reactor, target)
        self.assertEqual(api.credential_headers(), [["Authorization", "Bearer first-token"]])
        with open(path, "w") as f:
            f.write("rotated-token\n")
        self.assertEqual(api.credential_headers(), [["Authorization", "Bearer first-token"]])
        api.refresh_token()
        self.assertEqual(api.credential_headers(), [["Authorization", "Bearer rotated-token"]])

    def test_unreadable_token_file_keeps_the_last_token(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("kept-token\n")
        target = Target(server="https://127.0.0.1:6443", host="127.0.0.1", port=6443,
                        token_file=path)
        api = APIServer(reactor, target)
        os.unlink(path)
        api.refresh_token()
        self.assertEqual(api.credential_headers(), [["Authorization", "Bearer kept-token"]])


class _Hello(Protocol):
    def connectionMade(self):
        self.transport.write(b"hello")


class _Client(Protocol):
    def __init__(self):
        self.got = defer.Deferred()
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        if not self.got.called:
            self.got.callback(data)

    def connectionLost(self, reason):
        if not self.got.called:
            self.got.errback(reason)
        self.lost.callback(None)


class ClientCertificateTests(unittest.TestCase):
    """Guard connections present the kubeconfig's client certificate; passthrough ones never."""

    def setUp(self):
        ca, ca_key = pki.new_ca("upstream CA")
        cert, key = pki.issue(ca, ca_key, "apiserver", ips=["127.0.0.1"])
        client_cert, client_key = pki.issue(ca, ca_key, "arc-guard", client=True)
        server = ssl.PrivateCertificate.loadPEM(key + cert)
        options = ssl.CertificateOptions(
            privateKey=server.privateKey.original, certificate=server.original,
            verify=True, caCerts=[ssl.Certificate.loadPEM(ca).original],
            requireCertificate=True, acceptableProtocols=[b"http/1.1"])
        self.port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False,
                                                             Factory.forProtocol(_Hello)),
                                      interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        port = self.port.getHost().port
        self.api = APIServer(reactor, Target(
            server="https://127.0.0.1:%d" % port, host="127.0.0.1", port=port, ca_pem=ca,
            client_cert_pem=client_cert, client_key_pem=client_key))

    @defer.inlineCallbacks
    def test_guard_mode_presents_the_certificate(self):
        client = _Client()
        proto = yield self.api.connect(GUARD, Factory.forProtocol(lambda: client))
        self.assertEqual((yield client.got), b"hello")
        self.assertEqual(self.api.credential_headers(), [],
                         "a client certificate replaces the bearer header")
        proto.transport.loseConnection()
        yield client.lost

    @defer.inlineCallbacks
    def test_passthrough_mode_presents_nothing(self):
        client = _Client()
        proto = yield self.api.connect(PASSTHROUGH, Factory.forProtocol(lambda: client))
        with self.assertRaises(Exception):
            yield client.got
        proto.transport.loseConnection()
        yield client.lost


class _Resolver:
    """The reactor's name resolver, recording the names it is asked for."""

    def __init__(self):
        self.names = []

    def resolveHostName(self, receiver, hostName, *args, **kwargs):
        self.names.append(hostName)
        return reactor.nameResolver.resolveHostName(receiver, hostName, *args, **kwargs)


@implementer(IReactorPluggableNameResolver)
class _Reactor:
    """The global reactor with a recording name resolver."""

    def __init__(self):
        self.nameResolver = _Resolver()

    def installNameResolver(self, resolver):  # pragma: no cover - not used
        raise NotImplementedError

    def __getattr__(self, name):
        return getattr(reactor, name)


class AddressTests(unittest.TestCase):
    """An API server given by address is dialled without asking a resolver
    (each lookup costs a thread-pool round trip per connection); a name is
    looked up for every connection."""

    def setUp(self):
        ca, ca_key = pki.new_ca("upstream CA")
        cert, key = pki.issue(ca, ca_key, "apiserver", ips=["127.0.0.1"],
                              dns_names=["localhost"])
        server = ssl.PrivateCertificate.loadPEM(key + cert)
        options = ssl.CertificateOptions(privateKey=server.privateKey.original,
                                         certificate=server.original,
                                         acceptableProtocols=[b"http/1.1"])
        self.port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False,
                                                             Factory.forProtocol(_Hello)),
                                      interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.ca = ca

    @defer.inlineCallbacks
    def _hello(self, host):
        port = self.port.getHost().port
        fake = _Reactor()
        api = APIServer(fake, Target(server="https://%s:%d" % (host, port), host=host,
                                     port=port, ca_pem=self.ca))
        for _ in range(2):
            client = _Client()
            proto = yield api.connect(PASSTHROUGH, Factory.forProtocol(lambda: client))
            self.assertEqual((yield client.got), b"hello")
            proto.transport.loseConnection()
            yield client.lost
        return fake.nameResolver.names

    @defer.inlineCallbacks
    def test_address_needs_no_resolver(self):
        self.assertEqual((yield self._hello("127.0.0.1")), [])

    @defer.inlineCallbacks
    def test_name_is_resolved_for_each_connection(self):
        self.assertEqual((yield self._hello("localhost")), ["localhost", "localhost"])

"""Tests for arc.tlssocket: TLS on the socket itself, over real loopback sockets."""

import os
import socket
import ssl
import threading

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial import unittest
from zope.interface import implementer

from arc import pki, tlssocket
from arc.tls import client_options, is_tls_failure, server_options
from arc.tlssocket import TLSClient, TLSClientEndpoint, TLSServer, TLSServerFactory

CA, CA_KEY = pki.new_ca("tlssocket test CA")
CERT, KEY = pki.issue(CA, CA_KEY, "server", dns_names=["server.test"], ips=["127.0.0.1"])
OTHER_CA, _ = pki.new_ca("another CA")


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """Keeps what it receives; ``handshake`` fires once the TLS handshake is
    done (or the connection is lost first), ``done`` at connectionLost; the
    reason is kept in ``reason``."""

    def __init__(self, on_connect=None):
        self.data = bytearray()
        self.done = defer.Deferred()
        self.handshake = defer.Deferred()
        self.reason = None
        self.on_connect = on_connect

    def connectionMade(self):
        if self.on_connect is not None:
            self.on_connect(self)

    def handshakeCompleted(self):
        self.handshake.callback(None)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.reason = reason
        if not self.handshake.called:
            self.handshake.callback(None)
        self.done.callback(None)


def wait_until(predicate, timeout=10.0):
    """Deferred firing once ``predicate()`` holds (polled), failing after ``timeout``."""
    d = defer.Deferred()
    calls = [0]

    def poll():
        if predicate():
            loop.stop()
            return
        calls[0] += 1
        if calls[0] * 0.01 > timeout:
            loop.stop()
            raise AssertionError("condition not met within %.0f s" % timeout)

    loop = task.LoopingCall(poll)
    loop.start(0.01).addCallbacks(lambda _: d.callback(None), d.errback)
    return d


class Base(unittest.TestCase):
    def listen(self, build, protocols=(b"http/1.1",)):
        self.servers = []

        def make():
            protocol = build()
            self.servers.append(protocol)
            return protocol

        factory = TLSServerFactory(server_options(CERT, KEY, protocols=protocols),
                                   Factory.forProtocol(make))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def connect(self, port, protocol, name="server.test", ca=CA):
        endpoint = TLSClientEndpoint(client_options(name, ca_pem=ca),
                                     TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        return endpoint.connect(Factory.forProtocol(lambda: protocol))

    def cleanup_transport(self, protocol):
        self.addCleanup(lambda: protocol.transport and protocol.transport.abortConnection())


class RoundTripTests(Base):
    @defer.inlineCallbacks
    def test_both_ends_on_the_socket(self):
        port = self.listen(lambda: Recorder(lambda p: p.transport.write(b"hello from server")))
        client = Recorder(lambda p: p.transport.write(b"hello from client"))
        got = yield self.connect(port, client)
        self.assertIs(got, client)
        self.cleanup_transport(client)
        yield client.handshake
        yield wait_until(lambda: client.data == b"hello from server"
                         and self.servers and self.servers[0].data == b"hello from client")
        server = self.servers[0]
        self.assertIsInstance(client.transport, TLSClient)
        self.assertIsInstance(server.transport, TLSServer)
        self.assertTrue(tlssocket.is_tls(client.transport))
        # ALPN and the server name travel as with Twisted's TLS.
        self.assertEqual((client.transport.negotiatedProtocol, server.transport.negotiatedProtocol), (b"http/1.1", b"http/1.1"))
        self.assertEqual(server.transport.negotiatedProtocol, b"http/1.1")
        self.assertEqual(server.transport.getHandle().get_servername(), b"server.test")
        self.assertIsNotNone(client.transport.getPeerCertificate())

    @defer.inlineCallbacks
    def test_ip_address_name(self):
        port = self.listen(Recorder)
        client = Recorder(lambda p: p.transport.write(b"x"))
        yield self.connect(port, client, name="127.0.0.1")
        self.cleanup_transport(client)
        yield client.handshake
        yield wait_until(lambda: self.servers and self.servers[0].data == b"x")
        # No SNI is sent for an address.
        self.assertIsNone(self.servers[0].transport.getHandle().get_servername())

    @defer.inlineCallbacks
    def test_large_transfer_ends_with_close_notify(self):
        size = 8 * 1024 * 1024
        payload = bytes(range(256)) * (size // 256)

        def send(protocol):
            protocol.transport.write(payload)
            protocol.transport.loseConnection()

        port = self.listen(lambda: Recorder(send))
        result = {}

        def read():
            # The standard library's TLS, strict about the end: a close without
            # close_notify raises SSLEOFError.
            context = ssl.create_default_context(cadata=CA.decode())
            raw = socket.create_connection(("127.0.0.1", port), timeout=20)
            with context.wrap_socket(raw, server_hostname="server.test",
                                     suppress_ragged_eofs=False) as tls:
                chunks = []
                try:
                    while True:
                        data = tls.recv(1 << 20)
                        if not data:
                            break
                        chunks.append(data)
                except Exception as e:   # reported to the test below
                    result["error"] = e
                result["data"] = b"".join(chunks)

        yield task.deferLater(reactor, 0, lambda: None)
        yield threads_call(read)
        self.assertNotIn("error", result)
        self.assertEqual(len(result["data"]), size)
        self.assertTrue(result["data"] == payload)
        yield wait_until(lambda: self.servers and self.servers[0].reason is not None)

    @defer.inlineCallbacks
    def test_writes_during_a_read_leave_in_one_tls_write(self):
        sends = []

        class Echo(Recorder):
            def dataReceived(self, data):
                for _ in range(10):
                    self.transport.write(b"e" * 100)

        port = self.listen(Echo)
        client = Recorder(lambda p: p.transport.write(b"go"))
        yield self.connect(port, client)
        self.cleanup_transport(client)
        yield wait_until(lambda: bool(self.servers))
        server_transport = self.servers[0].transport
        original = server_transport.writeSomeData

        def counting(data):
            sends.append(len(data))
            return original(data)

        server_transport.writeSomeData = counting
        yield wait_until(lambda: len(client.data) == 1000)
        # Ten writes made while the read was being handled: one TLS write.
        self.assertEqual(sends, [1000])


class VerificationTests(Base):
    @defer.inlineCallbacks
    def assertRefused(self, name, ca, error):
        port = self.listen(Recorder)
        client = Recorder()
        yield self.connect(port, client, name=name, ca=ca)
        yield client.done
        self.assertTrue(client.reason.check(error), client.reason)
        self.assertTrue(is_tls_failure(client.reason.value))

    def test_wrong_name(self):
        return self.assertRefused("not-the-server.test", CA, VerificationError)

    def test_untrusted_ca(self):
        return self.assertRefused("server.test", OTHER_CA, SSL.Error)


class ClosingTests(Base):
    @defer.inlineCallbacks
    def test_close_before_the_handshake_drops_the_socket(self):
        # A peer that never finishes its handshake (here: never starts it) must
        # not keep the socket when the protocol gives up on it.
        port = self.listen(lambda: Recorder(lambda p: reactor.callLater(
            0.05, p.transport.loseConnection)))
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(raw.close)
        data = yield threads_call(raw.recv, 100)
        self.assertEqual(data, b"")
        yield wait_until(lambda: self.servers and self.servers[0].reason is not None)

    @defer.inlineCallbacks
    def test_linger_is_bounded(self):
        # After close_notify the connection drains what the peer sends, but a
        # peer that neither reads nor closes cannot hold it past LINGER.
        self.patch(tlssocket, "LINGER", 0.3)
        port = self.listen(lambda: Recorder(lambda p: reactor.callLater(
            0.2, p.transport.loseConnection)))
        client = Recorder()
        yield self.connect(port, client)
        self.cleanup_transport(client)
        yield client.handshake
        client.transport.pauseProducing()       # reads nothing, closes nothing
        client.transport.stopReading()
        yield wait_until(lambda: self.servers and self.servers[0].reason is not None,
                         timeout=5)

    @defer.inlineCallbacks
    def test_abort(self):
        port = self.listen(Recorder)
        client = Recorder()
        yield self.connect(port, client)
        yield client.handshake
        yield wait_until(lambda: bool(self.servers))
        self.servers[0].transport.abortConnection()
        yield client.done
        self.assertIsNotNone(client.reason)

    @defer.inlineCallbacks
    def test_half_close(self):
        @implementer(IHalfCloseableProtocol)
        class HalfServer(Recorder):
            def readConnectionLost(self):
                # The client said all it had to say: answer, then close.
                self.transport.write(b"answer to " + bytes(self.data))
                self.transport.loseConnection()

            def writeConnectionLost(self):
                pass

        @implementer(IHalfCloseableProtocol)
        class HalfClient(Recorder):
            eof = False

            def readConnectionLost(self):
                self.eof = True
                self.transport.loseConnection()

            def writeConnectionLost(self):
                pass

        port = self.listen(HalfServer)
        client = HalfClient(lambda p: (p.transport.write(b"question"),
                                       p.transport.loseWriteConnection()))
        yield self.connect(port, client)
        yield client.done
        self.assertEqual(bytes(client.data), b"answer to question")

    @defer.inlineCallbacks
    def test_paused_reading_resumes_with_everything(self):
        port = self.listen(Recorder)
        client = Recorder()
        yield self.connect(port, client)
        self.cleanup_transport(client)
        yield client.handshake
        yield wait_until(lambda: bool(self.servers))
        server = self.servers[0]
        server.transport.pauseProducing()
        client.transport.write(b"z" * 300000)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(server.data), 0)
        server.transport.resumeProducing()
        yield wait_until(lambda: len(server.data) == 300000)


class ResumptionTests(unittest.TestCase):
    """A client connection offers the session of the last one to the same
    server (same name, trust and client certificate: one ClientTLS), so a
    server that issues tickets skips its certificate and signature."""

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        cert, key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
        with open(cert, "wb") as f:
            f.write(CERT)
        with open(key, "wb") as f:
            f.write(KEY)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["http/1.1"])
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.addCleanup(self.listener.close)
        self.context = context
        self.reused = []

    def serve(self, connections):
        context = self.context

        def serve():
            # Blocking, in its own thread: the reactor's thread stays free.
            for _ in range(connections):
                try:
                    raw, _ = self.listener.accept()
                except OSError:
                    return
                with context.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(10)
                    conn.sendall(b"hi")
                    self.reused.append(conn.session_reused)
                    try:
                        conn.recv(1)     # until the client closes
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()
        return self.listener.getsockname()[1]

    @defer.inlineCallbacks
    def test_second_connection_resumes_and_is_still_checked(self):
        tls = client_options("server.test", ca_pem=CA)
        port = self.serve(3)
        for _ in range(3):
            client = Recorder()
            yield TLSClientEndpoint(tls, TCP4ClientEndpoint(reactor, "127.0.0.1", port)).connect(
                Factory.forProtocol(lambda: client))
            yield wait_until(lambda: client.data == b"hi")
            # The name check runs on resumed connections too: the peer
            # certificate comes with the session.
            self.assertIsNotNone(client.transport.getPeerCertificate())
            client.transport.loseConnection()
            yield client.done
        yield wait_until(lambda: len(self.reused) == 3)
        self.assertEqual(self.reused, [False, True, True])

    @defer.inlineCallbacks
    def test_sessions_are_not_shared_between_client_settings(self):
        port = self.serve(2)
        for _ in range(2):
            client = Recorder()
            tls = client_options("server.test", ca_pem=CA)
            yield TLSClientEndpoint(tls, TCP4ClientEndpoint(reactor, "127.0.0.1", port)).connect(
                Factory.forProtocol(lambda: client))
            yield wait_until(lambda: client.data == b"hi")
            client.transport.loseConnection()
            yield client.done
        yield wait_until(lambda: len(self.reused) == 2)
        self.assertEqual(self.reused, [False, False])


class FlushLaterTests(unittest.TestCase):
    """Writers queued for the end of the reactor turn (TLS connections, the
    WebSocket carrier's batches) are flushed one by one."""

    def test_a_failing_writer_does_not_hold_back_the_others(self):
        clock = task.Clock()     # not hookable: the flush is a callLater(0)
        flushed = []

        class Writer:
            _queued = False

            def __init__(self, name, fail=False):
                self.name = name
                self.fail = fail

            def _flush(self):
                flushed.append(self.name)
                if self.fail:
                    raise RuntimeError("cannot write")

        writers = [Writer("a"), Writer("b", fail=True), Writer("c")]
        self.assertEqual(tlssocket._dirty, [])
        for writer in writers:
            tlssocket.flush_later(writer, clock)
        self.assertEqual(flushed, [])
        clock.advance(0)
        self.assertEqual(flushed, ["a", "b", "c"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(any(writer._queued for writer in writers))


class FallbackTests(unittest.TestCase):
    """Anything but a plain TCP connection gets Twisted's memory-BIO TLS."""

    def test_server_side(self):
        factory = TLSServerFactory(server_options(CERT, KEY), Factory.forProtocol(Recorder))
        starter = factory.buildProtocol(None)
        transport = StringTransport()
        starter.makeConnection(transport)
        self.assertIsInstance(starter._target, TLSMemoryBIOProtocol)
        self.assertIsInstance(starter._target.wrappedProtocol, Recorder)

    def test_client_side(self):
        tls = client_options("server.test", ca_pem=CA)
        factory = tlssocket._ClientStarterFactory(tls, Factory.forProtocol(Recorder))
        starter = factory.buildProtocol(None)
        transport = StringTransport()
        starter.makeConnection(transport)
        self.assertIsInstance(starter._target, TLSMemoryBIOProtocol)
        # It said hello: a TLS handshake record.
        self.assertEqual(transport.value()[:1], b"\x16")
        self.assertIsInstance(factory.protocol_built, Recorder)


def threads_call(f, *args):
    """Run blocking ``f`` in a thread; a Deferred of its result."""
    d = defer.Deferred()

    def run():
        try:
            result = f(*args)
        except Exception as e:
            reactor.callFromThread(d.errback, e)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, daemon=True).start()
    return d


class DrainedTests(Base):
    @defer.inlineCallbacks
    def test_drained_is_called_once_everything_is_sent(self):
        port = self.listen(Recorder)
        client = Recorder()
        yield self.connect(port, client)
        self.cleanup_transport(client)
        yield client.handshake
        calls = []
        client.transport.drained = lambda: calls.append(client.transport.buffered_bytes())
        client.transport.write(b"q" * 1000000)
        self.assertEqual(client.transport.buffered_bytes(), 1000000)
        yield wait_until(lambda: calls)
        self.assertEqual(calls[0], 0)
        yield wait_until(lambda: self.servers and len(self.servers[0].data) == 1000000)

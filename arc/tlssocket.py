"""TLS run on the socket itself: the data path's transport.

Twisted's own TLS (``TLSMemoryBIOProtocol``) keeps OpenSSL behind two memory
BIOs: every received byte is copied into OpenSSL, every decrypted and every
encrypted byte is copied out again, each step a few Python calls, and writes
are gathered with a ``callLater(0)`` before they are encrypted.  On the
three hops of an arc stream that bookkeeping, not the cipher, was most of
the CPU a byte cost (docs/performance.md has the measurements).

Here OpenSSL (pyOpenSSL's ``Connection``, i.e. the OpenSSL that
``cryptography`` ships) reads from and writes to the TCP socket directly.
The connection is an ordinary ``twisted.internet.tcp`` transport whose class
is switched, once the TCP connection exists, to one whose ``doRead`` and
``writeSomeData`` go through TLS; everything else (producers, buffering,
aborts, addresses, ``setTcpNoDelay``) is Twisted's own code.  Two further
savings:

* what is written to a connection during one reactor iteration is sent at
  its end, one TLS write for all of it (many streams' frames share records
  and system calls), without the extra round through ``epoll`` that waiting
  for writability costs;
* one read event takes up to :data:`READ_LIMIT` bytes of records at once.

Where the transport is not a plain TCP connection (a TLS layer already,
or a test's in-memory transport) the factories here fall back to Twisted's
``TLSMemoryBIOProtocol`` with the same options, so behaviour is the same
either way.

TLS and half-close: ``loseWriteConnection`` sends ``close_notify`` (TLS 1.3
closes one direction with it) and keeps reading; a ``close_notify`` from the
peer ends the connection for protocols that cannot half-close and ends only
reading for those that can (``IHalfCloseableProtocol``).  A normal close
sends ``close_notify``, then keeps draining what the peer still sends for up
to :data:`LINGER` seconds so that it reads our last bytes instead of a
reset; ``abortConnection`` closes at once.
"""

import socket

from OpenSSL import SSL
from twisted.internet import error, main, tcp
from twisted.internet.interfaces import (IHalfCloseableProtocol, IHandshakeListener,
                                         IProtocolNegotiationFactory)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

_log = Logger()

# Bytes of records one read event may take before the reactor serves others.
READ_LIMIT = 256 * 1024
# A single SSL_read returns at most one record: 16 KiB of plaintext.
_RECORD = 16384
# OpenSSL writes each record with its own write(2); above this size they are
# corked into full segments, so the reader wakes up once, not once a record.
_CORK_ABOVE = 16384
# Seconds a closed connection keeps reading (and discarding) what the peer
# still sends, so that our last bytes are read rather than reset.
LINGER = 2.0

# pyOpenSSL turns on partial writes, with which SSL_write returns after every
# record: one Python call per 16 KiB.  Without them one call writes them all
# (a write the socket cannot take whole is retried with the same bytes, as
# Twisted's write loop does anyway).
_PARTIAL_WRITE = 0x1   # SSL_MODE_ENABLE_PARTIAL_WRITE


def whole_writes(context):
    """Let SSL_write write every record of a buffer in one call."""
    context.clear_mode(_PARTIAL_WRITE)
    return context


_WantRead = SSL.WantReadError
_WantWrite = SSL.WantWriteError
_ZeroReturn = SSL.ZeroReturnError
_SysCall = SSL.SysCallError
_Error = SSL.Error

# Connections written to since the reactor last flushed them.  They are sent
# once the events of the current reactor iteration have all been handled:
# just before the reactor waits for events again (see _hook), or, with a
# reactor that cannot be hooked, by a callLater(0).
_dirty = []
_scheduled = []
_hooked = set()


def _flush_dirty():
    del _scheduled[:]
    while _dirty:
        batch = list(_dirty)
        del _dirty[:]
        for writer in batch:
            writer._queued = False
            try:
                writer._flush()
            except Exception:
                # One writer's failure must not keep the others' bytes back.
                _log.failure("cannot send what {writer!r} holds", writer=writer)


def _hook(reactor):
    """Flush written connections each time ``reactor`` is about to poll.

    Twisted's reactors run ``doIteration(timeout)`` once per turn of their
    main loop, after the timed calls; wrapping it on the reactor object is
    cheaper than one DelayedCall per turn.  True when installed.
    """
    if id(reactor) in _hooked:
        return True
    poll = getattr(reactor, "doIteration", None)
    if poll is None or not hasattr(reactor, "mainLoop"):
        return False

    def doIteration(timeout):
        if _dirty:
            _flush_dirty()
            if _dirty:      # a flush that wrote more (a producer resumed)
                timeout = 0
        poll(timeout)

    reactor.doIteration = doIteration
    _hooked.add(id(reactor))
    return True


def flush_later(writer, reactor):
    """Call ``writer._flush()`` once this reactor turn's events are handled.

    ``writer`` has a ``_queued`` attribute (False while not queued), which
    this sets; a writer queued during the flush is flushed in the same one,
    after the writers before it, so what it writes to a TLS connection goes
    out in that connection's flush.
    """
    writer._queued = True
    _dirty.append(writer)
    if not _hook(reactor) and not _scheduled:
        _scheduled.append(reactor.callLater(0, _flush_dirty))


class _TLSMixin:
    """Mixed into ``tcp.Server``/``tcp.Client`` by :func:`start_tls`.

    It does not declare ``ISSLTransport``: libraries that see that interface
    expect Twisted's ``TLSMemoryBIOProtocol`` (autobahn reads channel
    bindings from it); :func:`is_tls` tells arc's own code.
    """

    TLS = False             # Twisted's startTLS machinery is not in use
    SEND_LIMIT = 256 * 1024
    _tls = None             # OpenSSL.SSL.Connection on self.socket
    _handshaking = True
    _check = None           # callable(connection) checking the peer once done
    _remember = None        # callable(connection) once the first data is read
    _queued = False
    _write_closed = False   # close_notify sent (loseWriteConnection)
    _read_closed = False    # close_notify received, protocol half-closed
    _lingering = None       # the timer of a closing connection draining input
    drained = None          # called each time everything written has been sent

    # Twisted's ALPN and SNI callbacks find ``connection.get_app_data().factory
    # .wrappedFactory`` and ``.abortConnection()`` (as on TLSMemoryBIOProtocol).
    factory = None

    def _start(self, connection, check, remember=None):
        self._tls = connection
        connection.set_app_data(self)
        self._check = check
        self._remember = remember
        self._handshaking = True
        self._tempDataBuffer = list(self._tempDataBuffer)

    # -- reading -------------------------------------------------------------

    def doRead(self):
        if self._handshaking:
            result = self._handshake()
            if result is None and not self._handshaking:
                result = self._read()
            return result
        if self._lingering is not None:
            return self._drain()
        return self._read()

    def _read(self):
        recv = self._tls.recv
        chunks = []
        size = 0
        end = None
        try:
            while size < READ_LIMIT:
                data = recv(_RECORD)
                chunks.append(data)
                size += len(data)
                if len(data) < _RECORD:
                    # Not a full record: most likely all the peer wrote for now.
                    # If more is waiting, epoll says so again; asking OpenSSL
                    # here would cost a failing read and an exception each time.
                    break
        except _WantRead:
            pass
        except _ZeroReturn:
            end = main.CONNECTION_DONE
        except _WantWrite:
            # Only a renegotiation can want to write here; TLS 1.3 has none.
            self.startWriting()
        except _SysCall as e:
            # (-1, 'Unexpected EOF'): the peer closed without close_notify.
            end = main.CONNECTION_DONE if e.args and e.args[0] == -1 else main.CONNECTION_LOST
        except _Error as e:
            end = e
        if chunks:
            if self._remember is not None:
                # A TLS 1.3 server sends its session tickets before its first
                # data: the session can be resumed from now on.
                remember, self._remember = self._remember, None
                remember(self._tls)
            self.protocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if end is main.CONNECTION_DONE and not self.disconnected:
            return self._peer_closed()
        return end

    def _peer_closed(self):
        """close_notify or EOF from the peer."""
        protocol = IHalfCloseableProtocol(self.protocol, None)
        if protocol is None or self._write_closed or self.disconnecting:
            if not self._write_closed:
                # Answer close_notify with ours (peers that wait for it, as
                # Twisted's TLS does, then close at once).
                self._write_closed = True
                try:
                    self._tls.shutdown()
                except _Error:
                    pass
            return main.CONNECTION_DONE
        self._read_closed = True
        self.stopReading()
        protocol.readConnectionLost()
        return None

    def readConnectionLost(self, reason):
        # Only reached through Twisted's own TCP EOF handling; see _peer_closed.
        self.connectionLost(reason)

    # -- handshake ------------------------------------------------------------

    def _handshake(self):
        try:
            self._tls.do_handshake()
        except _WantRead:
            self.startReading()
            return None
        except _WantWrite:
            self.startWriting()
            return None
        except _SysCall as e:
            if e.args and e.args[0] == -1:
                return error.ConnectionLost("the peer closed the connection during the TLS "
                                            "handshake")
            return e
        except _Error as e:
            return e
        self._handshaking = False
        if self._check is not None:
            try:
                self._check(self._tls)
            except Exception as e:   # service_identity.VerificationError and friends
                return e
        if (self.disconnecting or self._writeDisconnecting or self._tempDataBuffer
                or self.dataBuffer):
            self.startWriting()
        else:
            self.stopWriting()
        listener = IHandshakeListener(self.protocol, None)
        if listener is not None:
            listener.handshakeCompleted()
        return None

    # -- writing ----------------------------------------------------------------

    def write(self, data):
        if not self.connected or self._writeDisconnected or self._write_closed or not data:
            return
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)
        self._maybePauseProducer()
        self._want_flush()

    def writeSequence(self, iovec):
        if not self.connected or self._writeDisconnected or self._write_closed or not iovec:
            return
        self._tempDataBuffer.extend(iovec)
        for data in iovec:
            self._tempDataLen += len(data)
        self._maybePauseProducer()
        self._want_flush()

    def _want_flush(self):
        if not (self._handshaking or self._queued):
            flush_later(self, self.reactor)

    def _flush(self):
        """Send what is buffered now; wait for writability for the rest."""
        if self.disconnected or not self.connected or self._aborting:
            return
        temp = self._tempDataBuffer
        if (temp and not self.dataBuffer and not self.disconnecting
                and not self._writeDisconnecting and self.producer is None):
            # The common case, without Twisted's general doWrite: everything
            # written since the last flush, in one TLS write.
            data = temp[0] if len(temp) == 1 else b"".join(temp)
            self._tempDataBuffer = []
            self._tempDataLen = 0
            sent = self.writeSomeData(data)
            if isinstance(sent, int) and sent >= 0:
                if sent < len(data):
                    self.dataBuffer = data
                    self.offset = sent
                    self.startWriting()
                elif self.drained is not None:
                    self.drained()
                return
            why = sent
        else:
            why = self.doWrite()
        if why:
            self.stopReading()
            self.stopWriting()
            self.connectionLost(Failure(why))
        elif self.dataBuffer or self._tempDataBuffer:
            self.startWriting()

    def doWrite(self):
        if self._handshaking:
            result = self._handshake()
            if result is not None or self._handshaking:
                return result
        why = tcp.Connection.doWrite(self)
        if (why is None and self.drained is not None and not self._tempDataLen
                and not self.dataBuffer and not self.disconnecting):
            self.drained()
        return why

    def writeSomeData(self, data):
        """Encrypt and send as much of ``data`` as the socket takes now.

        One SSL_write sends every record of the buffer (the context has
        partial writes off, see :func:`whole_writes`); corked, so that they
        leave as full segments rather than one segment a record.  When the
        socket fills up, 0 is returned and the same bytes come again.
        """
        view = memoryview(data)[:self.SEND_LIMIT]
        size = len(view)
        if not size:
            return 0    # SSL_write of nothing reports an error
        corked = size > _CORK_ABOVE
        if corked:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            return self._tls.send(view)
        except (_WantWrite, _WantRead):
            return 0
        except _SysCall:
            return main.CONNECTION_LOST
        except _Error as e:
            return e
        finally:
            if corked:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    # -- closing ------------------------------------------------------------------

    def loseConnection(self):
        if (self._handshaking and self.connected and not self.disconnecting
                and not self._tempDataBuffer and not self.dataBuffer):
            # No TLS session yet and nothing to send, so nothing to close
            # gracefully (a peer that never finishes its handshake must not
            # keep the socket).  With data to send, the handshake goes on.
            self.disconnecting = True
            self.stopReading()
            self.stopWriting()
            self.reactor.callLater(0, self._closed_in_handshake)
            return
        tcp.Connection.loseConnection(self)

    def _closed_in_handshake(self):
        if not self.disconnected:
            self.connectionLost(Failure(main.CONNECTION_DONE))

    def _postLoseConnection(self):
        """Every byte is written: close_notify, then drain the peer for a while."""
        if not self._write_closed:
            try:
                self._tls.shutdown()
            except _WantWrite:
                # The socket is full: doWrite comes back here once it drains.
                self.startWriting()
                return None
            except _Error:
                return main.CONNECTION_DONE
            self._write_closed = True
        if self._read_closed:
            return main.CONNECTION_DONE
        return self._linger()

    def _linger(self):
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            return main.CONNECTION_DONE
        self.stopWriting()
        self.startReading()
        self._lingering = self.reactor.callLater(LINGER, self._linger_over)
        return None

    def _linger_over(self):
        self._lingering = None
        if not self.disconnected:
            self.stopReading()
            self.stopWriting()
            self.connectionLost(Failure(main.CONNECTION_DONE))

    def _drain(self):
        """Reading while closing: discard data until the peer closes too."""
        try:
            while True:
                self._tls.recv(_RECORD)
        except _WantRead:
            return None
        except _Error:
            timer, self._lingering = self._lingering, "done"
            if timer is not None and timer.active():
                timer.cancel()
            return main.CONNECTION_DONE

    def loseWriteConnection(self):
        """Half-close: close_notify (and a TCP FIN) after what is written."""
        self._writeDisconnecting = True
        self.startWriting()

    def _closeWriteConnection(self):
        if not self._write_closed:
            self._write_closed = True
            try:
                self._tls.shutdown()
            except _Error:
                pass
        return tcp.Connection._closeWriteConnection(self)

    def connectionLost(self, reason):
        timer, self._lingering = self._lingering, None
        if timer is not None and timer != "done" and timer.active():
            timer.cancel()
        if self._queued:
            self._queued = False
            if self in _dirty:
                _dirty.remove(self)
        tcp.Connection.connectionLost(self, reason)

    def buffered_bytes(self):
        """Bytes written to this connection and not yet sent to the socket."""
        return self._tempDataLen + len(self.dataBuffer) - self.offset

    # -- ISSLTransport and friends ----------------------------------------------------

    def getHandle(self):
        """The OpenSSL connection, as with Twisted's TLS (server name, ALPN...)."""
        return self._tls

    def getPeerCertificate(self):
        return self._tls.get_peer_certificate()

    @property
    def negotiatedProtocol(self):
        if self._tls is None or self._handshaking:
            return None
        return self._tls.get_alpn_proto_negotiated() or None


class TLSServer(_TLSMixin, tcp.Server):
    """An accepted TCP connection speaking TLS on its socket."""


class TLSClient(_TLSMixin, tcp.Client):
    """A dialed TCP connection speaking TLS on its socket."""


_CLASSES = {tcp.Server: TLSServer, tcp.Client: TLSClient}


def is_tls(transport):
    """True for a connection running TLS on its socket (this module's)."""
    return isinstance(transport, _TLSMixin)


def can_start(transport):
    """True when ``transport`` is a plain TCP connection with nothing buffered."""
    return (type(transport) in _CLASSES and transport.connected
            and not transport.disconnecting and not transport._tempDataBuffer
            and not transport.dataBuffer)


def start_tls(transport, connection, protocol, check=None, factory=None, remember=None):
    """Run ``protocol`` over TLS on the TCP connection ``transport``.

    ``connection`` is an ``OpenSSL.SSL.Connection`` made on
    ``transport.socket`` in accept or connect state; ``check(connection)``
    may refuse the peer once the handshake is done by raising; ``factory``
    (with ``wrappedFactory``) is what Twisted's ALPN callback asks for.  The
    protocol is connected at once, as with Twisted's TLS: what it writes
    before the handshake ends is sent after it, and ``handshakeCompleted``
    is called on an ``IHandshakeListener``.  ``remember(connection)`` is
    called once, when the first application data has been read.
    """
    transport.__class__ = _CLASSES[type(transport)]
    transport.factory = factory
    transport._start(connection, check, remember)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    if transport.connected and not transport.disconnected:
        why = transport._handshake()
        if why is not None:
            transport.stopReading()
            transport.stopWriting()
            transport.connectionLost(Failure(why))
    return transport


class _Starter(Protocol):
    """Placed by the factories below; replaced by the real protocol at once.

    On a plain TCP connection the transport switches to TLS on its socket
    and gets the real protocol.  On anything else, Twisted's memory-BIO TLS
    with the same options runs behind this object, which forwards to it.
    """

    _target = None

    def __init__(self, begin, fallback, addr):
        self.begin = begin
        self.fallback = fallback
        self.addr = addr

    def makeConnection(self, transport):
        if can_start(transport):
            self.begin(transport)
            return
        self._target = self.fallback.buildProtocol(self.addr)
        self._target.makeConnection(transport)

    def dataReceived(self, data):
        if self._target is not None:
            self._target.dataReceived(data)

    def connectionLost(self, reason):
        if self._target is not None:
            self._target.connectionLost(reason)


class _Wrapping(Factory):
    """A factory around ``wrappedFactory``, started and stopped with it."""

    noisy = False

    def doStart(self):
        self.wrappedFactory.doStart()

    def doStop(self):
        self.wrappedFactory.doStop()


@implementer(IProtocolNegotiationFactory)
class TLSServerFactory(_Wrapping):
    """Listener factory: TLS with ``options`` (``CertificateOptions``) around ``factory``.

    The replacement for ``TLSMemoryBIOFactory(options, False, factory)``.
    """

    def __init__(self, options, factory):
        self.options = options
        self.wrappedFactory = factory
        whole_writes(options.getContext())
        self._fallback = TLSMemoryBIOFactory(options, False, factory)

    def acceptableProtocols(self):
        return self._fallback.acceptableProtocols()

    def buildProtocol(self, addr):
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None

        def begin(transport):
            connection = SSL.Connection(self.options.getContext(), transport.socket)
            connection.set_accept_state()
            start_tls(transport, connection, protocol, factory=self)

        return _Starter(begin, _Fixed(self._fallback, protocol), addr)


class _Fixed:
    """A TLSMemoryBIOFactory whose wrapped protocol is already built."""

    def __init__(self, bio_factory, protocol):
        self.bio_factory = bio_factory
        self.protocol = protocol

    def buildProtocol(self, addr):
        factory = self.bio_factory
        return factory.protocol(factory, self.protocol)


class _ClientStarterFactory(_Wrapping):
    def __init__(self, tls, factory):
        self.tls = tls
        self.wrappedFactory = factory
        self.protocol_built = None

    def buildProtocol(self, addr):
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        self.protocol_built = protocol
        tls = self.tls

        def begin(transport):
            connection = tls.socket_connection(transport.socket)
            start_tls(transport, connection, protocol, tls.check, remember=tls.remember)

        fallback = _Fixed(TLSMemoryBIOFactory(tls, True, self.wrappedFactory), protocol)
        return _Starter(begin, fallback, addr)


@implementer(IProtocolNegotiationFactory)
class TLSClientEndpoint:
    """``IStreamClientEndpoint``: TLS described by ``tls`` over ``endpoint``.

    The replacement for ``wrapClientTLS``; ``tls`` is an
    :class:`arc.tls.ClientTLS`.  The Deferred fires with the protocol built
    by the caller's factory once the TCP connection exists (the handshake
    follows, as with Twisted's TLS).
    """

    def __init__(self, tls, endpoint):
        self.tls = tls
        self.endpoint = endpoint

    def connect(self, factory):
        starter = _ClientStarterFactory(self.tls, factory)
        return self.endpoint.connect(starter).addCallback(lambda _: starter.protocol_built)

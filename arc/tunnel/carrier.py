"""Carriers: how a tunnel session rides a TLS connection.

A tunnel starts as an HTTP/1.1 request so that it passes load balancers,
ingress controllers and CONNECT proxies.  Two upgrades are offered:

``Upgrade: arc-tunnel/1``
    after ``101 Switching Protocols`` the connection carries tunnel frames
    directly (the fastest path; nginx, HAProxy and Envoy pass any upgrade).
``Upgrade: websocket`` with sub-protocol ``arc-tunnel.v1``
    tunnel frames ride WebSocket binary messages (autobahn), for load
    balancers that pass only WebSocket.  Message boundaries carry no
    meaning: the concatenated payloads are the frame stream.

Refusals are ordinary HTTP answers: the status line's reason phrase and a
JSON body ``{"message": ...}`` say why, so the dialing side can print the
cause and the fix.
"""

import json
import re
import socket

from autobahn.twisted.websocket import (WebSocketClientFactory, WebSocketClientProtocol,
                                        WebSocketServerFactory, WebSocketServerProtocol)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from arc.ratelog import RateLimitedLog
from arc.tls import is_tls_failure, set_nodelay
from arc.tlssocket import flush_later, is_tls

TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)    # Linux

RAW_UPGRADE = "arc-tunnel/1"
WS_SUBPROTOCOL = "arc-tunnel.v1"
MAX_HEAD = 16 * 1024
MAX_ERROR_BODY = 4096


# Unsent bytes a tunnel socket may hold in the kernel: beyond it, frames wait
# in arc, where a small answer can overtake a large download's frames.
NOTSENT_LOWAT = 128 * 1024


def attach(session, transport):
    """Give ``session`` its carrier ``transport`` (raw tunnel carriers).

    On a TLS-on-socket transport the session paces its bulk frames by the
    transport's buffer, and the kernel keeps at most NOTSENT_LOWAT unsent
    bytes, so that other streams' frames are not queued behind a download.
    """
    session.transport = transport
    if is_tls(transport):
        try:
            transport.socket.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        except OSError:
            pass
        session.pace(transport)


def frame_sender(transport):
    """``send(chunks)`` for a session on ``transport``.

    Chunks may be memoryviews (the relay forwards payloads as views of what
    it read): a TLS transport gathers them itself, anything else gets one
    joined ``bytes``.
    """
    if is_tls(transport) or not hasattr(transport, "socket"):
        return transport.writeSequence

    def send(chunks):
        transport.write(b"".join(chunks))

    return send


class HeadError(Exception):
    """An HTTP head that cannot be accepted."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class UpgradeRefused(Exception):
    """The relay answered the tunnel request with something other than 101."""

    def __init__(self, status, message):
        super().__init__("%s %s" % (status, message))
        self.status = status
        self.message = message


def parse_head(buf):
    """Split an HTTP/1.1 head off ``buf``.

    Returns ``None`` while incomplete, else ``(start_line_parts, headers,
    rest)`` with ``headers`` a list of ``(lower-case name, value)``.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise HeadError(431, "request head larger than %d bytes" % MAX_HEAD)
        return None
    if end > MAX_HEAD:
        raise HeadError(431, "request head larger than %d bytes" % MAX_HEAD)
    try:
        text = bytes(buf[:end]).decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise HeadError(400, "undecodable head")
    lines = text.split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) < 2:
        raise HeadError(400, "malformed start line")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HeadError(400, "malformed header line")
        headers.append((name.lower(), value.strip()))
    return start, headers, bytes(buf[end + 4:])


def header_value(headers, name):
    for key, value in headers:
        if key == name:
            return value
    return None


def header_tokens(headers, name):
    tokens = set()
    for key, value in headers:
        if key == name:
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _reason_phrase(message):
    phrase = re.sub(r"[^\x20-\x7e]", "?", message)[:200]
    return phrase or "Error"


def http_error(status, message, extra_headers=()):
    """An HTTP/1.1 error answer whose reason phrase and body carry ``message``."""
    body = json.dumps({"message": message}).encode("utf-8")
    lines = ["HTTP/1.1 %d %s" % (status, _reason_phrase(message)),
             "Content-Type: application/json",
             "Content-Length: %d" % len(body),
             "Connection: close"]
    lines.extend("%s: %s" % h for h in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- accepting side ---------------------------------------------------------


class TunnelRequest:
    """What the accepting side learned from the upgrade request."""

    def __init__(self, method, path, headers, peer):
        self.method = method
        self.path = path
        self.headers = headers
        self.peer = peer

    def header(self, name):
        return header_value(self.headers, name)

    def bearer(self):
        value = self.header("authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()


class TunnelServerProtocol(Protocol):
    """Reads one HTTP/1.1 request head, authenticates it, then upgrades.

    The factory supplies ``accept(request) -> start`` where ``start(send,
    close)`` returns the session (``dataReceived``/``connectionLost``), or
    raises :class:`HeadError` to refuse; and ``plain(request) -> bytes`` for
    non-upgrade requests such as health checks.
    """

    log = Logger()

    def __init__(self, factory):
        self.factory = factory
        self._buf = bytearray()
        self._inner = None
        self._raw = False
        self._timer = None
        self._done = False

    def connectionMade(self):
        set_nodelay(self.transport)
        self._timer = self.factory.clock.callLater(self.factory.head_timeout, self._head_timeout)

    def _head_timeout(self):
        self._timer = None
        peer = self.transport.getPeer()
        violations = getattr(self.factory, "violations", None)
        if violations is None:
            violations = self.factory.violations = RateLimitedLog(self.factory.clock)
        violations.emit(
            ("head-timeout", getattr(peer, "host", None)), self.log.info,
            "tunnel request head not complete within {t} s from {peer}; closing",
            t=self.factory.head_timeout, peer=str(peer))
        if not self._buf:
            # Nothing came (or the TLS handshake never completed): nobody to
            # answer, and a TLS close would wait for the silent peer.
            self._done = True
            self.transport.abortConnection()
            return
        self._refuse(408, "request head not received in time")
        # A peer that does not read must not keep the socket: drop it soon.
        self.factory.clock.callLater(2.0, self._abort_if_open)

    def _abort_if_open(self):
        if self.connected:
            self.transport.abortConnection()

    def _refuse(self, status, message):
        self._done = True
        self._buf = bytearray()
        self._cancel_timer()
        self.transport.write(http_error(status, message))
        self.transport.loseConnection()

    def dataReceived(self, data):
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._done:
            if self.connected and self._buf:
                self._buf += data   # arrived while the upgrade was being decided
            return
        self._buf += data
        try:
            head = parse_head(self._buf)
        except HeadError as e:
            self._refuse(e.status, e.message)
            return
        if head is None:
            return
        self._cancel_timer()
        start, headers, rest = head
        method, path = start[0], start[1]
        request = TunnelRequest(method, path, headers, self.transport.getPeer())
        upgrade = header_tokens(headers, "upgrade")
        if not upgrade:
            self._done = True
            self.transport.write(self.factory.plain(request))
            self.transport.loseConnection()
            return
        if RAW_UPGRADE not in upgrade and "websocket" not in upgrade:
            self._refuse(400, "unsupported upgrade %r: use %s or websocket"
                         % (sorted(upgrade), RAW_UPGRADE))
            return
        # Authentication may take a round trip (an identity provider's keys):
        # hold the connection still until it is decided.
        self._done = True
        self.transport.pauseProducing()
        d = defer.maybeDeferred(self.factory.accept, request)
        d.addCallbacks(self._accepted, self._not_accepted, callbackArgs=(upgrade,))
        d.addErrback(self._failed)

    def _not_accepted(self, failure):
        failure.trap(HeadError)
        if self.connected:
            self._refuse(failure.value.status, failure.value.message)

    def _failed(self, failure):
        self.log.failure("accepting a tunnel failed", failure)
        if self.connected:
            self._refuse(500, "internal error at the relay")

    def _accepted(self, start_session, upgrade):
        if not self.connected:
            return
        self.transport.resumeProducing()
        buffered, self._buf = bytes(self._buf), bytearray()
        if RAW_UPGRADE in upgrade:
            rest = buffered[buffered.index(b"\r\n\r\n") + 4:]
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n"
                                 b"Connection: Upgrade\r\nUpgrade: " + RAW_UPGRADE.encode()
                                 + b"\r\n\r\n")
            session = start_session(frame_sender(self.transport), self.transport.loseConnection)
            attach(session, self.transport)
            self._inner = session
            self._raw = True
            # Hot path: frames go straight to the session from now on.
            self.dataReceived = session.dataReceived
            if rest:
                session.dataReceived(rest)
        else:
            ws = self.factory.websocket.buildProtocol(self.transport.getPeer())
            ws.start_session = start_session
            self._inner = ws
            ws.makeConnection(self.transport)
            ws.dataReceived(buffered)

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason):
        self.connected = 0
        self._cancel_timer()
        if self._raw:
            # A session takes a reason text (it ends up in stream resets).
            self._inner.connectionLost("tunnel connection lost: %s"
                                       % (reason.getErrorMessage(),))
        elif self._inner is not None:
            self._inner.connectionLost(reason)


# Frames written during one reactor turn travel as one WebSocket message;
# once this many bytes wait, they leave at once.  Small frames gain most from
# sharing a message; a download's frames are large already, and larger
# messages cost more per byte (measured; most likely each pass over one,
# joining and masking, runs out of the CPU's cache).  Both ends accept
# messages of up to 4 MiB.
WS_BATCH = 64 * 1024


class _Batching:
    """Frames a session writes during one reactor turn leave as one message.

    Each message costs autobahn a header, a masking pass and a few dozen
    Python calls on both ends, whatever its size; under load a turn writes
    many small frames (one request's DATA, another's WINDOW_UPDATE...).
    The message goes out when the turn's events are handled, before the TLS
    connection's own flush, or at once when WS_BATCH bytes are waiting.
    """

    _queued = False
    _batch = None
    _batch_size = 0

    def _send(self, chunks):
        batch = self._batch
        if batch is None:
            batch = self._batch = []
        batch.extend(chunks)
        for chunk in chunks:
            self._batch_size += len(chunk)
        if self._batch_size >= WS_BATCH:
            self._flush()
        elif not self._queued:
            flush_later(self, _reactor(self.transport))

    def _flush(self):
        batch = self._batch
        if batch:
            self._batch = None
            self._batch_size = 0
            self.sendMessage(batch[0] if len(batch) == 1 and type(batch[0]) is bytes
                             else b"".join(batch), isBinary=True)

    def _close(self):
        self._flush()
        self.dropConnection()


def _reactor(transport):
    reactor = getattr(transport, "reactor", None)
    if reactor is None:
        from twisted.internet import reactor
    return reactor


class _WSServerProtocol(_Batching, WebSocketServerProtocol):
    start_session = None
    session = None

    def onConnect(self, request):
        if WS_SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, "WebSocket sub-protocol %s required" % WS_SUBPROTOCOL)
        return WS_SUBPROTOCOL

    def onOpen(self):
        self.session = self.start_session(self._send, self._close)
        self.session.transport = self.transport

    def onMessage(self, payload, isBinary):
        self.session.dataReceived(payload)

    def onClose(self, wasClean, code, reason):
        if self.session is not None:
            session, self.session = self.session, None
            session.connectionLost("WebSocket closed: %s" % (reason or code,))


class TunnelServerFactory(Factory):
    """Listener factory; see :class:`TunnelServerProtocol`."""

    def __init__(self, clock, accept, plain, *, head_timeout=10.0, require_mask=False,
                 max_message=4 * 1024 * 1024):
        self.clock = clock
        self.accept = accept
        self.plain = plain
        self.head_timeout = head_timeout
        self.violations = RateLimitedLog(clock)
        self.websocket = WebSocketServerFactory()
        self.websocket.protocol = _WSServerProtocol
        self.websocket.setProtocolOptions(
            requireMaskedClientFrames=require_mask, maxMessagePayloadSize=max_message,
            maxFramePayloadSize=max_message, autoFragmentSize=0, failByDrop=True,
            openHandshakeTimeout=head_timeout, utf8validateIncoming=False)

    def buildProtocol(self, addr):
        return TunnelServerProtocol(self)


# -- dialing side ---------------------------------------------------------------


def request_head(host, path, headers, upgrade=RAW_UPGRADE):
    lines = ["GET %s HTTP/1.1" % path, "Host: %s" % host,
             "Connection: Upgrade", "Upgrade: %s" % upgrade]
    lines.extend("%s: %s" % (k, v) for k, v in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RawDialerProtocol(Protocol):
    """Sends the upgrade request, then carries the session's frames.

    ``upgraded`` fires with the session after ``101``, or fails with
    :class:`UpgradeRefused`.
    """

    def __init__(self, head, make_session, clock, timeout):
        self._head = head
        self._make_session = make_session
        self._clock = clock
        self._timeout = timeout
        self._buf = bytearray()
        self._status = None
        self._body_needed = 0
        self.session = None
        self.upgraded = defer.Deferred()
        self._timer = None

    def connectionMade(self):
        set_nodelay(self.transport)
        self.transport.write(self._head)
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def _timed_out(self):
        self._timer = None
        self._fail(UpgradeRefused(0, "no answer to the tunnel request within %.0f s"
                                  % self._timeout))
        self.transport.abortConnection()

    def _fail(self, exc):
        if not self.upgraded.called:
            self.upgraded.errback(exc)

    def dataReceived(self, data):
        self._buf += data
        if self._status is not None:
            self._collect_body()
            return
        try:
            head = parse_head(self._buf)
        except HeadError as e:
            self._fail(UpgradeRefused(0, "bad answer from relay: %s" % e.message))
            self.transport.abortConnection()
            return
        if head is None:
            return
        start, headers, rest = head
        try:
            status = int(start[1])
        except ValueError:
            status = 0
        if status == 101:
            self._cancel_timer()
            session = self._make_session()
            self.session = session
            session.connected(frame_sender(self.transport), self.transport.loseConnection)
            attach(session, self.transport)
            self.dataReceived = session.dataReceived
            self.upgraded.callback(session)
            if rest:
                session.dataReceived(rest)
            return
        self._status = (status, start[2] if len(start) > 2 else "")
        length = header_value(headers, "content-length")
        self._body_needed = min(int(length), MAX_ERROR_BODY) if length and length.isdigit() else 0
        self._buf = bytearray(rest)
        self._collect_body()

    def _collect_body(self):
        if len(self._buf) < self._body_needed:
            return
        self._cancel_timer()
        status, phrase = self._status
        message = phrase
        try:
            message = json.loads(bytes(self._buf[:self._body_needed]))["message"]
        except (ValueError, KeyError, TypeError):
            pass
        self._fail(UpgradeRefused(status, message))
        self.transport.loseConnection()

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason):
        self._cancel_timer()
        if self.session is not None:
            self.session.connectionLost("connection to relay lost: %s"
                                        % (reason.getErrorMessage(),))
        elif is_tls_failure(reason.value):
            self._fail(reason.value)
        else:
            self._fail(UpgradeRefused(0, "connection closed before the tunnel was up: %s"
                                      % (reason.getErrorMessage(),)))


class RawDialerFactory(Factory):
    def __init__(self, host, path, headers, make_session, clock, timeout=15.0):
        self.head = request_head(host, path, headers)
        self.make_session = make_session
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr):
        return RawDialerProtocol(self.head, self.make_session, self.clock, self.timeout)


_WS_FAIL = re.compile(r"upgrade failed \[(\d+)\]: ?(.*)", re.S)


class _WSDialerProtocol(_Batching, WebSocketClientProtocol):
    session = None

    def __init__(self):
        super().__init__()
        self.upgraded = defer.Deferred()

    def connectionMade(self):
        # autobahn's own tcpNoDelay option is not applied to client protocols
        # built this way; without it Nagle meets delayed ACKs (40 ms stalls).
        set_nodelay(self.transport)
        super().connectionMade()

    def onOpen(self):
        self.session = self.factory.make_session()
        self.session.connected(self._send, self._close)
        self.session.transport = self.transport
        self.upgraded.callback(self.session)

    def onMessage(self, payload, isBinary):
        self.session.dataReceived(payload)

    def onClose(self, wasClean, code, reason):
        if self.session is not None:
            session, self.session = self.session, None
            session.connectionLost("WebSocket to relay closed: %s" % (reason or code,))
            return
        if not self.upgraded.called:
            text = self.wasNotCleanReason or reason or "connection closed"
            match = _WS_FAIL.search(text)
            if match:
                self.upgraded.errback(UpgradeRefused(int(match.group(1)), match.group(2)))
            else:
                self.upgraded.errback(UpgradeRefused(0, text))


def websocket_dialer_factory(url, headers, make_session, *, mask=True, timeout=15.0):
    factory = WebSocketClientFactory(url, protocols=[WS_SUBPROTOCOL], headers=headers)
    factory.protocol = _WSDialerProtocol
    factory.make_session = make_session
    factory.setProtocolOptions(maskClientFrames=mask, autoFragmentSize=0,
                               maxMessagePayloadSize=4 * 1024 * 1024,
                               maxFramePayloadSize=4 * 1024 * 1024, failByDrop=True,
                               openHandshakeTimeout=timeout, tcpNoDelay=True)
    return factory

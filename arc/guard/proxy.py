"""The guard: a streaming HTTP/1.1 reverse proxy that authenticates every request.

One :class:`GuardProtocol` serves one downstream connection — a tunnel
stream in the agent, or a TLS socket when the guard runs alone — and keeps
at most one upstream connection to kube-apiserver for it (keep-alive).

For each request: read the head (bounded), clean the identity headers
(:mod:`arc.guard.headers`), authenticate the bearer token, then forward the
head with impersonation headers and the guard's own credentials (or, in
passthrough mode, the caller's token and no credential of the guard's).
Bodies stream both ways as bytes with backpressure; only their end is
tracked (:mod:`arc.guard.http1`).  An upgrade (exec, attach, port-forward,
WebSocket or SPDY) is authenticated like any request; once the API server
answers ``101`` the connection is spliced as raw bytes.  Client
``Impersonate-*`` headers of an authenticated caller go on only as far as
the API server's SubjectAccessReviews allow (:mod:`arc.guard.sar`).  Every
request leaves one audit record.
"""

import re
import time

from twisted.internet.defer import fail
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from arc import status as kstatus
from arc.guard import http1
from arc.guard.audit import AuditRecord, new_audit_id
from arc.guard.headers import clean_head, credential_lines, header_lines, identity_lines
from arc.guard.http1 import HTTPError
from arc.guard.requestinfo import request_info
from arc.guard.sar import ImpersonationRefused, check_impersonation
from arc.identity.authenticator import PASSTHROUGH
from arc.identity.model import AuthError, Principal
from arc.tls import set_nodelay

HEAD, AUTH, BODY, WAIT, SPLICED, CLOSED = range(6)

# ``Connection: close`` from the client, as a whole header line.
_CLOSE_LINE = re.compile(r"\r\nconnection:[ \t]*close[ \t]*(?=\r\n|$)", re.I)
PASSTHROUGH_MODE = "passthrough"
GUARD_MODE = "guard"


class _PauseGate:
    """Pauses a transport while any reason holds; the reasons are independent."""

    def __init__(self, transport):
        self.transport = transport
        self.reasons = set()

    def pause(self, reason):
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason):
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()

    # IPushProducer, for the upstream transport: "my buffer is full".
    def pauseProducing(self):
        self.pause("upstream-full")

    def resumeProducing(self):
        self.resume("upstream-full")

    def stopProducing(self):
        pass


class QuietFactory(Factory):
    """One connection per factory: no "Starting factory" log line each time."""

    noisy = False

    def __init__(self, build):
        self.build = build

    def buildProtocol(self, addr):
        protocol = self.build()
        protocol.factory = self
        return protocol


class _UpstreamSide(Protocol):
    def __init__(self, guard):
        self.serve(guard)

    def serve(self, guard):
        """Work for ``guard`` (a new connection, or one taken from the idle ones)."""
        self.guard = guard
        # The API server's bytes go straight to the guard.
        self.dataReceived = guard.upstream_data

    def connectionMade(self):
        set_nodelay(self.transport)
        self.guard.upstream_connected(self)

    def connectionLost(self, reason):
        self.guard.upstream_lost(self, reason)


@implementer(IHalfCloseableProtocol)
class GuardProtocol(Protocol):
    log = Logger()

    def __init__(self, guard, peer=""):
        self.guard = guard
        self.peer = peer
        self.state = HEAD
        self._in = b""             # bytes not yet consumed (bytes, or a bytearray)
        self._gate = None
        self._up = None            # _UpstreamSide, once connected
        self._up_mode = None
        self._up_pending = None    # bytes for an upstream being connected
        self._req_body = None
        self._req_method = None
        self._req_close = False
        self._up_closing = False   # the last request told the API server to close
        self._resp_state = None    # None: no request outstanding; HEAD; BODY
        self._resp_buf = bytearray()
        self._resp_body = None
        self._resp_started = False
        self._resp_close = False
        self._record = None
        self._audit_id = None
        self._started = 0.0
        self._idle_timer = None
        self._idle_timeout = None
        self._idle_since = None    # when the wait for the next request began; None: busy
        self._clock = None

    # -- downstream ----------------------------------------------------------

    def connectionMade(self):
        set_nodelay(self.transport)
        self._gate = _PauseGate(self.transport)
        self._idle_timeout = getattr(getattr(self.guard, "cfg", None), "idle_timeout", None)
        self._clock = getattr(getattr(self.guard, "upstream", None), "reactor", None)
        self._arm_idle()

    # The wait for the next complete request head is timed (only between
    # requests).  One timer runs per connection: a request starting only
    # marks the connection busy, and the timer, when it fires, looks again
    # at when the connection last became idle.

    def _arm_idle(self):
        """The connection waits for a request head from now on."""
        if self._idle_timeout and self._clock is not None:
            self._idle_since = self._clock.seconds()
            if self._idle_timer is None:
                self._idle_timer = self._clock.callLater(self._idle_timeout, self._idle_check)

    def _cancel_idle(self):
        self._idle_since = None
        if self._idle_timer is not None:
            if self._idle_timer.active():
                self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_check(self):
        self._idle_timer = None
        if self._idle_since is None:
            return      # busy: armed again when the request ends
        left = self._idle_since + self._idle_timeout - self._clock.seconds()
        if left > 0:
            self._idle_timer = self._clock.callLater(left, self._idle_check)
            return
        self._idle_expired(self._idle_timeout)

    def _idle_expired(self, timeout):
        self._idle_timer = None
        if self.state != HEAD or self._resp_state is not None:
            return
        if self._in:
            # A head sent a byte now and then (slowloris): answered and closed.
            self._refuse(408, "request head not complete within %.0f s (guard idle_timeout)"
                         % (timeout,))
            return
        self.log.debug("guard: connection idle for {t} s between requests; closing",
                       t=timeout)
        self.state = CLOSED
        self.transport.loseConnection()

    def dataReceived(self, data):
        if self.state == SPLICED:
            self._count_in(len(data))
            self._up.transport.write(data)
            return
        if self.state == CLOSED:
            return
        if self._in:
            if type(self._in) is bytes:
                self._in = bytearray(self._in)
            self._in += data
        else:
            self._in = data if type(data) is bytes else bytes(data)
        self._advance()

    def readConnectionLost(self):
        """The client half-closed: answer what it asked, then close."""
        self._req_close = True
        if self.state == SPLICED:
            if self._up is not None:
                self._up.transport.loseWriteConnection()
        elif self.state == HEAD and not self._in and self._resp_state is None:
            self.state = CLOSED
            self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self._cancel_idle()
        previous, self.state = self.state, CLOSED
        up, self._up = self._up, None
        if up is not None and not (previous == HEAD and self._park(up)):
            up.transport.abortConnection()
        if self._record is not None and previous != CLOSED:
            if previous == SPLICED:
                # exec, attach, port-forward: the session ended from the client's side.
                self._finish_record(status=101, reason="")
            else:
                self._finish_record(status=self._record.status or 499,
                                    reason=self._record.reason or "client went away")

    def _advance(self):
        while True:
            if self.state == HEAD:
                if not self._in:
                    return
                buf = self._in
                try:
                    end = http1.split_head(buf)
                    if end < 0:
                        return
                    self._idle_since = None     # busy (see _arm_idle)
                    raw = buf[:end]
                    self._in = buf[end:]
                    head = http1.parse_head(raw)
                    kind, length = http1.request_framing(head)
                except HTTPError as e:
                    self._refuse(e.status, e.message)
                    return
                self._req_body = http1.body_tracker(kind, length)
                self.state = AUTH
                self._begin(head)
                return
            if self.state == BODY:
                if self._in:
                    buf = self._in
                    try:
                        end = self._req_body.feed(buf, 0)
                    except HTTPError as e:
                        self._refuse(e.status, e.message)
                        return
                    if end:
                        if end == len(buf):
                            chunk, self._in = bytes(buf), b""
                        else:
                            chunk, self._in = bytes(buf[:end]), buf[end:]
                        self._to_upstream(chunk)
                        self._count_in(len(chunk))
                if not self._req_body.done:
                    return
                self.state = WAIT
            if self.state == WAIT:
                if self._resp_state is not None:
                    # A pipelined request waits for this response; keep it small.
                    if len(self._in) > http1.MAX_HEAD:
                        self._gate.pause("pipelined")
                    return
                self.state = HEAD
                if self._gate.reasons:
                    self._gate.resume("pipelined")
                continue
            return

    # -- per request -----------------------------------------------------------

    def _begin(self, head):
        method, target, _ = head.start
        self._req_method = method
        self._req_close = "close" in head.tokens("connection")
        self._started = time.monotonic()
        self._audit_id = new_audit_id()
        record = self._record = AuditRecord()
        record.audit_id = self._audit_id
        record.cluster = self.guard.cluster
        record.peer = self.peer
        info = request_info(method, target)
        record.verb = info.verb
        record.api_group = info.api_group
        record.resource = info.resource
        record.namespace = info.namespace
        record.name = info.name
        record.subresource = info.subresource
        try:
            cleaned = clean_head(head, self.guard.allow_impersonation)
        except HTTPError as e:
            self._refuse(e.status, e.message)
            return
        record.upgrade = cleaned.upgrade
        if cleaned.bearer is None:
            self._refuse(401, "no bearer token in the request: the kubeconfig user for this "
                              "cluster needs a token (arc token / tokenFile)")
            return
        # The authenticator answers at once when it can (verdict); the
        # connection stops reading only while an answer is awaited.
        authenticator = self.guard.authenticator
        verdict = getattr(authenticator, "verdict", None)
        try:
            principal = (verdict or authenticator.authenticate)(cleaned.bearer)
        except AuthError:
            principal = fail()
        if principal is PASSTHROUGH or isinstance(principal, Principal):
            try:
                self._authenticated(principal, head, cleaned)
            except Exception:
                self._internal_error(Failure())
            return
        self._gate.pause("auth")
        principal.addCallbacks(self._authenticated, self._auth_failed,
                               callbackArgs=(head, cleaned))
        principal.addErrback(self._internal_error)

    def _auth_failed(self, failure):
        if self.state == CLOSED:
            return
        if failure.check(AuthError):
            self._record.method = ""
            self._refuse(401, "guard of cluster %r refused the token: %s"
                         % (self.guard.cluster, failure.value.reason),
                         reason="authentication: " + failure.value.code)
            return
        return failure

    def _internal_error(self, failure):
        self.log.failure("guard request handling failed", failure)
        if self.state != CLOSED:
            self._refuse(500, "internal error in the guard of cluster %r" % (self.guard.cluster,))

    def _authenticated(self, principal, head, cleaned):
        if self.state == CLOSED:
            return
        if principal is not PASSTHROUGH and cleaned.impersonation:
            # kubectl --as: only what SubjectAccessReviews allow (arc.guard.sar).
            self._record_caller(principal)
            self._gate.pause("auth")
            d = check_impersonation(self.guard, principal, cleaned.impersonation)
            d.addCallbacks(self._forward, self._impersonation_refused,
                           callbackArgs=(principal, head, cleaned))
            d.addErrback(self._internal_error)
            return
        self._forward(None, principal, head, cleaned)

    def _record_caller(self, principal):
        record = self._record
        record.method = principal.method
        record.issuer = principal.issuer
        record.subject = principal.subject
        record.user = principal.username
        record.groups = list(principal.groups)

    def _impersonation_refused(self, failure):
        if self.state == CLOSED:
            return
        if not failure.check(ImpersonationRefused):
            return failure
        refusal = failure.value
        if refusal.requested is not None:
            self._record.impersonated_user = refusal.requested.user
            self._record.impersonated_groups = list(refusal.requested.groups)
        self._refuse(refusal.status, "guard of cluster %r: %s" % (self.guard.cluster,
                                                                  refusal.message),
                     reason="client impersonation: " + refusal.message)

    def _forward(self, requested, principal, head, cleaned):
        """Send the head on: as the caller, as the identity it asked for, or passed through."""
        if self.state == CLOSED:
            return
        record = self._record
        if principal is PASSTHROUGH:
            mode = PASSTHROUGH_MODE
            record.method = "passthrough"
            added = "\r\nAuthorization: Bearer " + cleaned.bearer
            if cleaned.impersonation:
                added += header_lines(cleaned.impersonation)
        else:
            mode = GUARD_MODE
            self._record_caller(principal)
            if requested is None:
                record.impersonated_user = principal.username
                record.impersonated_groups = list(principal.groups)
                added = identity_lines(principal)
            else:
                record.impersonated_user = requested.user
                record.impersonated_groups = list(requested.groups)
                added = header_lines(requested.headers())
            added += credential_lines(self.guard.upstream.credential_headers())
        record.decision = "allow"
        method, target, version = head.start
        text = cleaned.header_text()
        if self._req_close and not cleaned.upgrade and version == "HTTP/1.1":
            # Connection is hop-by-hop: the client's "close" is the guard's to
            # honour (it closes the client connection after the answer); the
            # connection to the API server stays alive for the next client.
            text = _CLOSE_LINE.sub("", text)
        self._up_closing = version != "HTTP/1.1" or "close" in text.lower()
        raw = ("%s %s %s%s%s\r\nAudit-ID: %s\r\n\r\n"
               % (method, target, version, text, added, self._audit_id)).encode("latin-1")
        self._resp_state = HEAD
        self._resp_started = False
        self._send_head(mode, raw)

    def _park(self, side):
        """Leave an idle upstream connection for the next client connection.

        Only between requests: the last answer was complete and kept the
        connection alive.  True if it was kept.
        """
        idle = getattr(self.guard.upstream, "idle", None)
        if (idle is None or self._resp_state is not None or self._resp_close
                or self._up_closing):
            return False
        if getattr(side.transport, "producer", None) is not None:
            side.transport.unregisterProducer()
        return idle.put(self._up_mode, side)

    def _send_head(self, mode, raw):
        self._record.bytes_in += len(raw)
        if self._up is not None and self._up_mode == mode:
            self._up.transport.write(raw)
            self._request_flowing()
            return
        if self._up is not None:
            old, self._up = self._up, None
            self._detach(old)
            if not self._park(old):
                old.transport.loseConnection()
        self._up_mode = mode
        idle = getattr(self.guard.upstream, "idle", None)
        side = idle.take(mode) if idle is not None else None
        if side is not None:
            # A connection another client left idle: no new TLS handshake.
            side.serve(self)
            self._up_pending = [raw]
            self.upstream_connected(side)
            return
        self._up_pending = [raw]
        # Nothing more is read from the client until the API server answers.
        self._gate.pause("auth")
        d = self.guard.upstream.connect(mode, QuietFactory(lambda: _UpstreamSide(self)))
        d.addErrback(self._upstream_failed)

    def _request_flowing(self):
        self.state = BODY
        if self._gate.reasons:
            self._gate.resume("auth")
        self._advance()

    def _to_upstream(self, data):
        if self._up is not None:
            self._up.transport.write(data)
        elif self._up_pending is not None:
            self._up_pending.append(data)

    # -- upstream ------------------------------------------------------------

    def upstream_connected(self, side):
        if self.state == CLOSED:
            side.transport.abortConnection()
            return
        self._up = side
        pending, self._up_pending = self._up_pending or [], None
        side.transport.writeSequence(pending)
        side.transport.registerProducer(self._gate, True)
        self.transport.registerProducer(side.transport, True)
        self._request_flowing()

    def _upstream_failed(self, failure):
        if self.state == CLOSED:
            return
        self._up_pending = None
        self.log.warn("guard cannot reach the API server {server}: {error}",
                      server=self.guard.upstream.describe(), error=failure.getErrorMessage())
        self._refuse(502, "guard of cluster %r cannot reach the API server %s: %s"
                     % (self.guard.cluster, self.guard.upstream.describe(),
                        failure.getErrorMessage()), reason="upstream unreachable")

    def upstream_data(self, data):
        if self.state == SPLICED:
            self._count_out(len(data))
            self.transport.write(data)
            return
        if self._resp_state == HEAD:
            if self._resp_buf:
                self._resp_buf += data
                buf = self._resp_buf
            else:
                buf = data
            try:
                end = http1.split_head(buf)
                if end < 0:
                    if buf is data:
                        self._resp_buf = bytearray(data)
                    return
                raw = bytes(buf[:end])
                rest = bytes(buf[end:])
                self._resp_buf = bytearray()
                head = http1.parse_head(raw, request=False)
            except HTTPError as e:
                self._upstream_broken("bad answer from the API server: %s" % e.message)
                return
            self._response_head(head, raw, rest)
        elif self._resp_state == BODY:
            self._response_body(data)
        elif data:
            # Bytes with no request outstanding: the API server broke framing.
            self._upstream_broken("unexpected bytes from the API server")

    def _response_head(self, head, raw, rest):
        status = int(head.start[1])
        if head.get("audit-id") is None:
            raw = raw[:-2] + b"Audit-ID: " + self._audit_id.encode() + b"\r\n\r\n"
        self._resp_started = True
        self._count_out(len(raw))
        if status == 101:
            self.transport.write(raw)
            self._record.status = 101
            self.state = SPLICED
            self._resp_state = None
            leftover, self._in = bytes(self._in), b""
            self._gate.resume("pipelined")
            if leftover:
                self._count_in(len(leftover))
                self._up.transport.write(leftover)
            if rest:
                self._count_out(len(rest))
                self.transport.write(rest)
            return
        if 100 <= status < 200:
            self.transport.write(raw)
            self._resp_state = HEAD
            if rest:
                self.upstream_data(rest)
            return
        self._record.status = status
        kind, length = http1.response_framing(head, self._req_method)
        tracker = self._resp_body = http1.body_tracker(kind, length)
        self._resp_close = "close" in head.tokens("connection")
        self._resp_state = BODY
        if not rest and not tracker.done:
            self.transport.write(raw)
            return
        # The head and the body bytes that came with it leave in one write.
        try:
            end = tracker.feed(rest, 0)
        except HTTPError as e:
            self.transport.write(raw)
            self._upstream_broken("bad chunked answer from the API server: %s" % e.message)
            return
        if end:
            self._record.bytes_out += end
            self.transport.writeSequence((raw, rest if end == len(rest) else rest[:end]))
        else:
            self.transport.write(raw)
        if tracker.done:
            self._response_done()

    def _response_body(self, data):
        tracker = self._resp_body
        try:
            end = tracker.feed(data, 0)
        except HTTPError as e:
            self._upstream_broken("bad chunked answer from the API server: %s" % e.message)
            return
        if end:
            self._count_out(end)
            self.transport.write(data if end == len(data) else data[:end])
        if tracker.done:
            self._response_done()

    def _response_done(self):
        self._resp_state = None
        self._finish_record(status=self._record.status, reason="")
        if self._req_close or self._resp_close:
            self.state = CLOSED
            self.transport.loseConnection()
            up, self._up = self._up, None
            if up is not None:
                self._detach(up)
                if not self._park(up):
                    up.transport.loseConnection()
            return
        if self.state == WAIT:
            self._advance()
        if self.state == HEAD:
            self._arm_idle()

    def _detach(self, side):
        """Undo the producer registrations made in :meth:`upstream_connected`."""
        side.transport.unregisterProducer()
        if self.state != CLOSED:
            self.transport.unregisterProducer()
            self._gate.resume("upstream-full")

    def upstream_lost(self, side, reason):
        if side is not self._up:
            return
        self._up = None
        self._detach(side)
        if self.state == CLOSED:
            return
        if self.state == SPLICED:
            self._finish_record(status=101, reason="")
            self.state = CLOSED
            self.transport.loseConnection()
            return
        if self._resp_state == BODY and self._resp_body.kind == http1.UNTIL_CLOSE:
            self._response_done()
            self.state = CLOSED
            self.transport.loseConnection()
            return
        if self._resp_state is not None or self.state in (BODY, WAIT):
            self._upstream_broken("the API server closed the connection mid-request: %s"
                                  % (reason.getErrorMessage(),))

    def _upstream_broken(self, message):
        self.log.warn("guard: {message}", message=message)
        if self._resp_started:
            self._finish_record(status=self._record.status or 502, reason=message)
            self.state = CLOSED
            self.transport.abortConnection()
        else:
            self._refuse(502, message, reason=message)
        if self._up is not None:
            up, self._up = self._up, None
            up.transport.abortConnection()

    # -- answers, audit ----------------------------------------------------------

    def _refuse(self, code, message, reason=None):
        """Answer with a Kubernetes Status and close the connection."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        answer = kstatus.status_response(code, message)
        self.transport.write(answer)
        self.transport.loseConnection()
        if self._up is not None:
            up, self._up = self._up, None
            up.transport.abortConnection()
        if self._record is None:
            self._record = AuditRecord()
            self._record.audit_id = new_audit_id()
            self._record.cluster = self.guard.cluster
            self._record.peer = self.peer
            self._started = time.monotonic()
        self._record.decision = "deny" if code in (400, 401, 403, 431) else "error"
        self._finish_record(status=code, reason=reason or message)

    def _finish_record(self, status, reason):
        record, self._record = self._record, None
        if record is None:
            return
        record.status = status
        if reason:
            record.reason = reason
        if not record.decision:
            record.decision = "allow"
        record.duration_ms = round((time.monotonic() - self._started) * 1000, 3)
        self.guard.audit.emit(record)
        metrics = getattr(self.guard, "metrics", None)
        if metrics is not None:
            metrics.request(record)

    def _count_in(self, n):
        if self._record is not None:
            self._record.bytes_in += n

    def _count_out(self, n):
        if self._record is not None:
            self._record.bytes_out += n

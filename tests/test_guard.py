"""The guard proxy, in memory: downstream and upstream are StringTransports."""

import json

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from arc.guard.headers import WS_BEARER_PREFIX, clean, impersonation_headers
from arc.guard.http1 import HTTPError
from arc.guard.proxy import GuardProtocol
from arc.guard.upstream import GUARD, PASSTHROUGH
from arc.identity.authenticator import Authenticator
from arc.identity.model import AuthError, Principal
from arc.identity.static import StaticTokens
from arc.relay.registry import token_digest


class FakeAudit:
    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(record)


class FakeUpstream:
    """Connects instantly (or on demand) to StringTransports."""

    def __init__(self, token="guard-sa-token"):
        self.connections = []
        self.token = token
        self.manual = False
        self.pending = []

    def describe(self):
        return "https://api.test:6443"

    def credential_headers(self):
        return [["Authorization", "Bearer " + self.token]]

    def connect(self, mode, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        self.connections.append((mode, protocol, transport))
        d = defer.Deferred()
        if self.manual:
            self.pending.append((protocol, transport, d))
        else:
            protocol.makeConnection(transport)
            d.callback(protocol)
        return d


class Guard:
    def __init__(self, authenticator, allow_impersonation=False):
        self.cluster = "demo"
        self.authenticator = authenticator
        self.allow_impersonation = allow_impersonation
        self.audit = FakeAudit()
        self.upstream = FakeUpstream()


ALICE = "alice-token-0123456789"


def static_authenticator(passthrough=False):
    static = StaticTokens({"alice": (token_digest(ALICE), ("dev", "ops"))})
    return Authenticator(static, (), passthrough)


class OIDCLike:
    """An authenticator returning a fixed OIDC principal, or failing."""

    def __init__(self, principal=None, error=None):
        self.principal = principal
        self.error = error
        self.tokens = []

    def authenticate(self, token):
        self.tokens.append(token)
        if self.error:
            return defer.fail(self.error)
        return defer.succeed(self.principal)


def request(path="/api/v1/namespaces/default/pods", method="GET", headers=(), body=b"",
            token=ALICE):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1"]
    if token is not None:
        lines.append("Authorization: Bearer %s" % token)
    lines.extend("%s: %s" % h for h in headers)
    if body:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_forwarded(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0], [tuple(line.split(": ", 1)) for line in lines[1:]], body


class GuardTestCase(unittest.TestCase):
    def setUp(self):
        self.guard = Guard(static_authenticator())

    def connect(self):
        proto = GuardProtocol(self.guard, "test-peer")
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def upstream(self, index=-1):
        return self.guard.upstream.connections[index]

    def status_of(self, transport):
        data = transport.value()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body), head.decode()


class ImpersonationTests(GuardTestCase):
    def test_static_token_is_impersonated(self):
        proto, down = self.connect()
        proto.dataReceived(request(headers=[("Accept", "application/json")]))
        mode, up, up_t = self.upstream()
        self.assertEqual(mode, GUARD)
        line, headers, _ = parse_forwarded(up_t.value())
        self.assertEqual(line, "GET /api/v1/namespaces/default/pods HTTP/1.1")
        names = [h[0].lower() for h in headers]
        self.assertIn(("Impersonate-User", "alice"), headers)
        self.assertEqual([v for k, v in headers if k == "Impersonate-Group"], ["dev", "ops"])
        self.assertEqual([v for k, v in headers if k == "Authorization"],
                         ["Bearer guard-sa-token"])
        self.assertEqual(names.count("audit-id"), 1)
        self.assertNotIn(ALICE, up_t.value().decode())

    def test_response_streams_back_with_audit_id(self):
        proto, down = self.connect()
        proto.dataReceived(request())
        mode, up, up_t = self.upstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        up.dataReceived(b"5\r\nhello\r\n")
        self.assertIn(b"5\r\nhello\r\n", down.value())
        self.assertIn(b"Audit-ID: ", down.value())
        up.dataReceived(b"0\r\n\r\n")
        self.assertEqual(len(self.guard.audit.records), 1)
        record = self.guard.audit.records[0]
        self.assertEqual((record.user, record.status, record.verb), ("alice", 200, "list"))
        self.assertEqual(record.decision, "allow")

    def test_keep_alive_each_request_authenticated(self):
        auth = OIDCLike(Principal("bob", ("g",), {}, "https://idp", "sub-1", "oidc"))
        self.guard.authenticator = auth
        proto, down = self.connect()
        proto.dataReceived(request(token="t1"))
        mode, up, up_t = self.upstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        proto.dataReceived(request(token="t2", path="/version"))
        self.assertEqual(auth.tokens, ["t1", "t2"])
        self.assertEqual(len(self.guard.upstream.connections), 1, "upstream reused")
        self.assertEqual(up_t.value().count(b"GET "), 2)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(down.value().count(b"HTTP/1.1 200 OK"), 2)
        self.assertEqual(len(self.guard.audit.records), 2)

    def test_request_body_streams_with_content_length(self):
        proto, down = self.connect()
        body = b'{"kind":"ConfigMap"}'
        data = request(method="POST", path="/api/v1/namespaces/default/configmaps", body=body)
        # Split anywhere: the head across two reads, the body in pieces.
        proto.dataReceived(data[:10])
        proto.dataReceived(data[10:-5])
        proto.dataReceived(data[-5:])
        mode, up, up_t = self.upstream()
        self.assertTrue(up_t.value().endswith(body))

    def test_chunked_request_body(self):
        proto, down = self.connect()
        head = request(method="POST", headers=[("Transfer-Encoding", "chunked")])
        proto.dataReceived(head + b"3\r\nabc\r\n0\r\n\r\n")
        mode, up, up_t = self.upstream()
        self.assertTrue(up_t.value().endswith(b"3\r\nabc\r\n0\r\n\r\n"))

    def test_upgrade_is_spliced_after_101(self):
        proto, down = self.connect()
        proto.dataReceived(request(path="/api/v1/namespaces/default/pods/p/exec?command=ls",
                                   headers=[("Connection", "Upgrade"),
                                            ("Upgrade", "SPDY/3.1"),
                                            ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
                                            ("X-Stream-Protocol-Version", "v3.channel.k8s.io")]))
        mode, up, up_t = self.upstream()
        line, headers, _ = parse_forwarded(up_t.value())
        self.assertEqual([v for k, v in headers if k == "X-Stream-Protocol-Version"],
                         ["v4.channel.k8s.io", "v3.channel.k8s.io"])
        up.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n\r\nraw1")
        self.assertTrue(down.value().endswith(b"raw1"))
        up_t.clear()
        proto.dataReceived(b"\x80\x03 not http at all")
        self.assertEqual(up_t.value(), b"\x80\x03 not http at all")
        up.connectionLost(None)
        self.assertEqual(self.guard.audit.records[0].status, 101)
        self.assertEqual(self.guard.audit.records[0].upgrade, "spdy")

    def test_passthrough_keeps_token_and_adds_no_identity(self):
        self.guard.authenticator = static_authenticator(passthrough=True)
        proto, down = self.connect()
        proto.dataReceived(request(token="kubernetes-sa-token"))
        mode, up, up_t = self.upstream()
        self.assertEqual(mode, PASSTHROUGH)
        line, headers, _ = parse_forwarded(up_t.value())
        self.assertEqual([v for k, v in headers if k == "Authorization"],
                         ["Bearer kubernetes-sa-token"])
        self.assertFalse([k for k, v in headers if k.lower().startswith("impersonate-")])

    def test_mode_change_opens_a_new_upstream(self):
        self.guard.authenticator = static_authenticator(passthrough=True)
        proto, down = self.connect()
        proto.dataReceived(request(token="kubernetes-sa-token"))
        self.upstream()[1].dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        proto.dataReceived(request())
        self.assertEqual([c[0] for c in self.guard.upstream.connections],
                         [PASSTHROUGH, GUARD])


class CountingTransport(StringTransport):
    """A StringTransport that counts writes and pauses."""

    def __init__(self):
        super().__init__()
        self.writes = 0
        self.pauses = 0

    def write(self, data):
        self.writes += 1
        super().write(data)

    def writeSequence(self, seq):
        self.writes += 1
        super().writeSequence(seq)

    def pauseProducing(self):
        self.pauses += 1
        super().pauseProducing()


class CallTests(GuardTestCase):
    """What a request costs the transports: in the agent, frames on the tunnel."""

    def connect(self):
        proto = GuardProtocol(self.guard, "test-peer")
        transport = CountingTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_a_known_token_does_not_pause_the_client(self):
        proto, down = self.connect()
        proto.dataReceived(request())
        mode, up, up_t = self.upstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(down.pauses, 1, "paused while the API server is dialled")
        for _ in range(3):
            proto.dataReceived(request())
            up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(down.pauses, 1)
        self.assertEqual(len(self.guard.audit.records), 4)

    def test_a_token_checked_later_pauses_the_client(self):
        self.guard.authenticator = OIDCLike(Principal("bob", (), {}, "https://i", "s", "oidc"))
        proto, down = self.connect()
        proto.dataReceived(request(token="t1"))
        self.upstream()[1].dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        proto.dataReceived(request(token="t2"))
        self.assertEqual(down.pauses, 2)

    def test_response_head_and_body_leave_in_one_write(self):
        proto, down = self.connect()
        proto.dataReceived(request())
        mode, up, up_t = self.upstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(down.writes, 1)
        self.assertTrue(down.value().endswith(b"\r\n\r\nhello"))
        self.assertEqual(self.guard.audit.records[-1].bytes_out, len(down.value()))


class RefusalTests(GuardTestCase):
    def assertRefused(self, data, code, text):
        proto, down = self.connect()
        proto.dataReceived(data)
        status, body, head = self.status_of(down)
        self.assertEqual(status, code)
        self.assertEqual(body["kind"], "Status")
        self.assertIn(text, body["message"])
        self.assertEqual(self.guard.upstream.connections, [])
        self.assertTrue(down.disconnecting)
        self.assertEqual(self.guard.audit.records[-1].status, code)
        return body

    def test_no_token(self):
        self.assertRefused(request(token=None), 401, "no bearer token")

    def test_unknown_token(self):
        body = self.assertRefused(request(token="nope-token-xyz"), 401, "refused the token")
        self.assertNotIn("nope-token-xyz", json.dumps(body))
        self.assertNotIn("nope-token-xyz", self.guard.audit.records[-1].to_json())

    def test_basic_auth_refused(self):
        data = request(token=None, headers=[("Authorization", "Basic YTpi")])
        self.assertRefused(data, 401, "bearer token")

    def test_double_authorization(self):
        data = request(headers=[("Authorization", "Bearer other")])
        self.assertRefused(data, 400, "more than one Authorization")

    def test_bare_lf_cannot_smuggle_a_header(self):
        # Go's parser ends a line at a lone LF: a value holding one would carry
        # Impersonate-* (or a second Authorization) past the checks.
        for value in ("a\nImpersonate-User: system:admin",
                      "a\nImpersonate-Group: system:masters", "a\rX: y", "a\n"):
            self.assertRefused(request(headers=[("X-Note", value)]), 400, "bare CR or LF")
        self.assertRefused(request().replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\n"),
                           400, "bare CR or LF")
        # In passthrough mode the token itself cannot carry one either.
        self.assertRefused(request(token="tok\nImpersonate-User: root"), 400, "bare CR or LF")

    def test_impersonate_headers_any_case(self):
        for name in ("Impersonate-User", "impersonate-group", "IMPERSONATE-EXTRA-scopes",
                     "Impersonate-Uid"):
            self.assertRefused(request(headers=[(name, "root")]), 403, "impersonation")

    def test_connection_naming_protected_header(self):
        for value in ("close, Impersonate-User", "Authorization", "x-remote-user",
                      "audit-id", "X-Forwarded-For"):
            self.assertRefused(request(headers=[("Connection", value)]), 400,
                               "Connection header")

    def test_oversized_head(self):
        data = request(headers=[("X-Big", "a" * 70000)])
        self.assertRefused(data, 431, "larger than")

    def test_smuggling_refused(self):
        data = request(method="POST", headers=[("Transfer-Encoding", "chunked"),
                                               ("Content-Length", "4")])
        self.assertRefused(data, 400, "smuggling")

    def test_system_identity_refused_by_authenticator(self):
        self.guard.authenticator = OIDCLike(error=AuthError(
            "forbidden_identity", "identities starting with system: are reserved"))
        self.assertRefused(request(token="jwt-like"), 401, "system:")

    def test_oidc_principal_with_client_impersonation_refused(self):
        self.guard.authenticator = OIDCLike(Principal("bob", (), {}, "https://i", "s", "oidc"))
        self.assertRefused(request(headers=[("Impersonate-User", "root")]), 403,
                           "not allowed through this guard")

    def test_upstream_unreachable(self):
        self.guard.upstream.manual = True
        proto, down = self.connect()
        proto.dataReceived(request())
        _, _, d = self.guard.upstream.pending[0]
        d.errback(ConnectionRefusedError("connection refused"))
        status, body, _ = self.status_of(down)
        self.assertEqual(status, 502)
        self.assertIn("cannot reach the API server", body["message"])


class HeaderTests(unittest.TestCase):
    def test_stripped_headers(self):
        cleaned = clean([["Authorization", "Bearer t"], ["X-Remote-User", "root"],
                         ["x-remote-group", "system:masters"], ["X-Forwarded-For", "1.2.3.4"],
                         ["Audit-ID", "chosen"], ["Proxy-Authorization", "Basic x"],
                         ["Accept", "application/json"]])
        self.assertEqual(cleaned.headers, [["Accept", "application/json"]])
        self.assertEqual(cleaned.bearer, "t")

    def test_websocket_bearer_entry(self):
        import base64
        encoded = base64.urlsafe_b64encode(b"ws-token").decode().rstrip("=")
        cleaned = clean([["Sec-WebSocket-Protocol",
                          "v5.channel.k8s.io, %s%s" % (WS_BEARER_PREFIX, encoded)]])
        self.assertEqual(cleaned.bearer, "ws-token")
        self.assertEqual(cleaned.headers, [["Sec-WebSocket-Protocol", "v5.channel.k8s.io"]])

    def test_bearer_in_both_places(self):
        import base64
        encoded = base64.urlsafe_b64encode(b"x").decode()
        with self.assertRaises(HTTPError):
            clean([["Authorization", "Bearer t"],
                   ["Sec-WebSocket-Protocol", WS_BEARER_PREFIX + encoded]])

    def test_extra_keys_lower_case_percent_encoded(self):
        headers = impersonation_headers("u", ("a", "b"), {"Arc.dev/Issuer": ("https://x",),
                                                          "scopes": ("r", "w")})
        self.assertIn(["Impersonate-Extra-arc.dev%2Fissuer", "https://x"], headers)
        self.assertEqual([v for k, v in headers if k == "Impersonate-Extra-scopes"], ["r", "w"])
        self.assertEqual([v for k, v in headers if k == "Impersonate-Group"], ["a", "b"])


class PooledUpstream(FakeUpstream):
    """A FakeUpstream whose connections look like live sockets, with an idle pool."""

    def __init__(self, clock, **kw):
        super().__init__(**kw)
        from arc.guard.upstream import IdleConnections
        self.idle = IdleConnections(clock, most=2, timeout=30.0)

    def connect(self, mode, factory):
        d = super().connect(mode, factory)
        self.connections[-1][2].connected = True
        return d


class UpstreamPoolTests(GuardTestCase):
    """A keep-alive connection to the API server outlives its client connection."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def setUp(self):
        from twisted.internet.task import Clock
        super().setUp()
        self.clock = Clock()
        self.guard.upstream = PooledUpstream(self.clock)

    def exchange(self, token=ALICE, answer=OK, close=True):
        proto, down = self.connect()
        proto.dataReceived(request(token=token))
        mode, up, up_t = self.upstream()
        up.dataReceived(answer)
        if close:
            proto.connectionLost(None)
        return proto, down, up, up_t

    def test_next_client_connection_reuses_it(self):
        _, down1, up, up_t = self.exchange()
        self.assertFalse(up_t.disconnecting, "kept, not closed")
        self.assertEqual(len(self.guard.upstream.idle), 1)
        _, down2, _, _ = self.exchange()
        self.assertEqual(len(self.guard.upstream.connections), 1, "no second connection")
        self.assertEqual(up_t.value().count(b"GET "), 2)
        self.assertEqual(down2.value().count(b"HTTP/1.1 200 OK"), 1)
        # Each request carried its own credentials and identity.
        self.assertEqual(up_t.value().count(b"Impersonate-User: alice"), 2)
        self.assertEqual(len(self.guard.audit.records), 2)

    def test_modes_never_share(self):
        self.exchange()                               # a guard-mode connection parked
        self.guard.authenticator = static_authenticator(passthrough=True)
        self.exchange(token="a-kubernetes-token")     # passthrough: a new one
        modes = [mode for mode, _, _ in self.guard.upstream.connections]
        self.assertEqual(modes, [GUARD, PASSTHROUGH])

    def test_not_kept_after_connection_close(self):
        _, _, up, up_t = self.exchange(
            answer=b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(up_t.disconnecting)
        self.assertEqual(len(self.guard.upstream.idle), 0)

    def test_not_kept_mid_answer(self):
        _, _, up, up_t = self.exchange(answer=b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
        self.assertTrue(up_t.disconnecting)
        self.assertEqual(len(self.guard.upstream.idle), 0)

    def test_parked_connection_that_speaks_is_dropped(self):
        _, _, up, up_t = self.exchange()
        up.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(up_t.disconnecting)
        self.assertEqual(len(self.guard.upstream.idle), 0)
        self.exchange()
        self.assertEqual(len(self.guard.upstream.connections), 2)

    def test_closed_by_the_api_server_while_parked(self):
        _, _, up, up_t = self.exchange()
        up.connectionLost(None)
        self.assertEqual(len(self.guard.upstream.idle), 0)

    def test_idle_timeout_and_limit(self):
        protos = [self.exchange(close=False) for _ in range(3)]
        for proto, _, _, _ in protos:
            proto.connectionLost(None)
        self.assertEqual(len(self.guard.upstream.idle), 2, "at most `most` kept")
        self.assertTrue(protos[2][3].disconnecting)
        self.clock.advance(31)
        self.assertEqual(len(self.guard.upstream.idle), 0)
        self.assertTrue(all(p[3].disconnecting for p in protos))

    def test_client_connection_close_stays_with_the_client(self):
        # "Connection: close" is hop-by-hop: the client's connection closes
        # after the answer, the one to the API server is kept.
        proto, down = self.connect()
        proto.dataReceived(request(headers=[("Connection", "close")]))
        mode, up, up_t = self.upstream()
        self.assertNotIn(b"close", up_t.value().lower())
        up.dataReceived(self.OK)
        self.assertTrue(down.disconnecting)
        proto.connectionLost(None)
        self.assertFalse(up_t.disconnecting)
        self.assertEqual(len(self.guard.upstream.idle), 1)

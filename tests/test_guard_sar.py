"""Client impersonation checked by SubjectAccessReview (arc.guard.sar), in memory.

The guard's connections to the API server are StringTransports: the
reviews it posts are read back from them and answered by the test, and the
request it finally forwards is inspected the same way.
"""

import json

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from arc.guard import sar
from arc.guard.proxy import GuardProtocol
from arc.guard.upstream import GUARD, PASSTHROUGH
from arc.identity.model import Principal
from tests.test_guard import (
    ALICE,
    FakeAudit,
    OIDCLike,
    parse_forwarded,
    request,
    static_authenticator,
)

GUARD_TOKEN = "guard-sa-token"


class ClosingTransport(StringTransport):
    """A StringTransport whose close reaches its protocol on the next turn, as a socket's does."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.protocol = None

    def loseConnection(self):
        super().loseConnection()
        self.clock.callLater(0, self._lost)

    abortConnection = loseConnection

    def _lost(self):
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(Failure(ConnectionDone()))


class ReviewingUpstream:
    """A fake APIServer: connections are StringTransports, reviews are answered by hand."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.connections = []      # (mode, protocol, transport)
        self.refuse = None         # an exception: every connect fails with it
        self._read = {}            # transport -> bytes of it already parsed

    def describe(self):
        return "https://api.test:6443"

    def credential_headers(self):
        return [["Authorization", "Bearer " + GUARD_TOKEN]]

    def connect(self, mode, factory):
        if self.refuse is not None:
            return defer.fail(self.refuse)
        protocol = factory.buildProtocol(None)
        transport = ClosingTransport(self.reactor)
        self.connections.append((mode, protocol, transport))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return defer.succeed(protocol)

    def review_connections(self):
        return [c for c in self.connections if c[2].value().startswith(b"POST ")]

    def forwarded(self):
        """Connections carrying the caller's request (not reviews)."""
        return [c for c in self.connections if not c[2].value().startswith(b"POST ")]

    def pending_reviews(self):
        """``(protocol, head lines, review dict)`` for each review not yet answered."""
        out = []
        for mode, protocol, transport in self.review_connections():
            data = transport.value()
            offset = self._read.get(transport, 0)
            while offset < len(data):
                end = data.index(b"\r\n\r\n", offset) + 4
                lines = data[offset:end].decode("latin-1").split("\r\n")
                length = [int(line.split(":")[1]) for line in lines
                          if line.lower().startswith("content-length:")][0]
                body = json.loads(data[end:end + length])
                offset = end + length
                out.append((mode, protocol, lines, body))
            self._read[transport] = offset
        return out

    def answer(self, decide, code=201):
        """Answer every pending review with ``decide(review) -> (allowed, reason)``."""
        reviews = self.pending_reviews()
        for mode, protocol, lines, review in reviews:
            allowed, reason = decide(review)
            body = json.dumps({"kind": "SubjectAccessReview", "apiVersion":
                               "authorization.k8s.io/v1", "spec": review["spec"],
                               "status": {"allowed": allowed, "reason": reason}}).encode()
            protocol.dataReceived(b"HTTP/1.1 %d Answer\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (code, len(body), body))
        return reviews


class Guard:
    def __init__(self, authenticator, clock):
        self.cluster = "demo"
        self.authenticator = authenticator
        self.allow_impersonation = True
        self.audit = FakeAudit()
        self.upstream = ReviewingUpstream(clock)


def allow_all(review):
    return True, "RBAC: allowed by ClusterRoleBinding \"impersonators\""


def deny_groups(review):
    if review["spec"]["resourceAttributes"]["resource"] == "groups":
        return False, ""
    return True, ""


class ImpersonationTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.guard = Guard(static_authenticator(), self.clock)
        self.upstream = self.guard.upstream

    def connect(self):
        proto = GuardProtocol(self.guard, "test-peer")
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def send(self, *impersonation, token=ALICE, path="/api/v1/namespaces/default/pods"):
        proto, down = self.connect()
        proto.dataReceived(request(path=path, headers=impersonation, token=token))
        return proto, down

    def status_of(self, down):
        head, _, body = down.value().partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body)


class ForwardTests(ImpersonationTestCase):
    def test_allowed_identity_is_forwarded_in_place_of_the_caller(self):
        self.send(("Impersonate-User", "bob"), ("Impersonate-Group", "admins"),
                  ("Impersonate-Group", "viewers"))
        self.assertEqual(self.upstream.forwarded(), [], "nothing forwarded before the answers")
        reviews = self.upstream.answer(allow_all)
        self.assertEqual(len(reviews), 3)
        [(mode, up, up_t)] = self.upstream.forwarded()
        self.assertEqual(mode, GUARD)
        _, headers, _ = parse_forwarded(up_t.value())
        self.assertEqual([v for k, v in headers if k == "Impersonate-User"], ["bob"])
        self.assertEqual([v for k, v in headers if k == "Impersonate-Group"],
                         ["admins", "viewers"])
        self.assertEqual([v for k, v in headers if k == "Authorization"],
                         ["Bearer " + GUARD_TOKEN])
        self.assertNotIn(b"alice", up_t.value(), "the caller's own identity is not sent")
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        [record] = self.guard.audit.records
        self.assertEqual((record.user, record.groups), ("alice", ["dev", "ops"]))
        self.assertEqual((record.impersonated_user, record.impersonated_groups),
                         ("bob", ["admins", "viewers"]))
        self.assertEqual((record.decision, record.status), ("allow", 200))

    def test_reviews_ask_about_the_caller_with_the_guards_credentials(self):
        self.send(("Impersonate-User", "bob"), ("Impersonate-Group", "admins"))
        reviews = self.upstream.pending_reviews()
        self.assertEqual({r[0] for r in reviews}, {GUARD})
        for mode, protocol, lines, review in reviews:
            self.assertEqual(lines[0],
                             "POST /apis/authorization.k8s.io/v1/subjectaccessreviews HTTP/1.1")
            self.assertIn("Authorization: Bearer " + GUARD_TOKEN, lines)
            self.assertEqual(review["kind"], "SubjectAccessReview")
            self.assertEqual(review["spec"]["user"], "alice")
            self.assertEqual(review["spec"]["groups"], ["dev", "ops", "system:authenticated"])
        self.assertEqual(sorted(r[3]["spec"]["resourceAttributes"]["resource"] for r in reviews),
                         ["groups", "users"])
        for connection in self.upstream.review_connections():
            self.assertNotIn(ALICE.encode(), connection[2].value())

    def test_client_header_spelling_is_not_forwarded(self):
        self.send(("impersonate-user", "bob"), ("IMPERSONATE-EXTRA-Scopes%2fWrite", "yes"),
                  ("Impersonate-Uid", "1234"))
        reviews = self.upstream.answer(allow_all)
        attributes = sorted((r[3]["spec"]["resourceAttributes"]["resource"],
                             r[3]["spec"]["resourceAttributes"].get("subresource", ""),
                             r[3]["spec"]["resourceAttributes"]["name"],
                             r[3]["spec"]["resourceAttributes"]["group"]) for r in reviews)
        self.assertEqual(attributes, [
            ("uids", "", "1234", "authentication.k8s.io"),
            ("userextras", "scopes/write", "yes", "authentication.k8s.io"),
            ("users", "", "bob", ""),
        ])
        [(mode, up, up_t)] = self.upstream.forwarded()
        _, headers, _ = parse_forwarded(up_t.value())
        identity = [h for h in headers if h[0].lower().startswith("impersonate-")]
        self.assertEqual(identity, [("Impersonate-User", "bob"), ("Impersonate-Uid", "1234"),
                                    ("Impersonate-Extra-scopes%2Fwrite", "yes")])

    def test_service_account_is_asked_as_a_service_account(self):
        self.send(("Impersonate-User", "system:serviceaccount:kube-system:deployer"))
        [(_, _, _, review)] = self.upstream.pending_reviews()
        self.assertEqual(review["spec"]["resourceAttributes"],
                         {"verb": "impersonate", "resource": "serviceaccounts",
                          "namespace": "kube-system", "name": "deployer", "group": ""})

    def test_oidc_caller_extra_goes_into_the_review(self):
        self.guard.authenticator = OIDCLike(Principal(
            "oidc:carol", ("oidc:dev",), {"arc.dev/issuer": ("https://idp",)},
            "https://idp", "carol", "oidc"))
        self.send(("Impersonate-User", "bob"), token="jwt")
        [(_, _, _, review)] = self.upstream.pending_reviews()
        self.assertEqual(review["spec"]["extra"], {"arc.dev/issuer": ["https://idp"]})
        self.assertEqual(review["spec"]["user"], "oidc:carol")

    def test_allowed_answers_are_cached_briefly(self):
        self.send(("Impersonate-User", "bob"))
        self.assertEqual(len(self.upstream.answer(allow_all)), 1)
        self.send(("Impersonate-User", "bob"))
        self.assertEqual(self.upstream.pending_reviews(), [], "answered from the cache")
        self.assertEqual(len(self.upstream.forwarded()), 2)
        self.clock.advance(sar.ALLOW_TTL + 1)
        self.send(("Impersonate-User", "bob"))
        self.assertEqual(len(self.upstream.answer(allow_all)), 1, "asked again after the TTL")
        self.assertEqual(len(self.upstream.forwarded()), 3)

    def test_identical_reviews_under_way_are_shared(self):
        self.send(("Impersonate-User", "bob"))
        self.send(("Impersonate-User", "bob"))
        self.assertEqual(len(self.upstream.answer(allow_all)), 1)
        self.assertEqual(len(self.upstream.forwarded()), 2)

    def test_passthrough_caller_headers_go_unchanged_without_review(self):
        self.guard.authenticator = static_authenticator(passthrough=True)
        self.send(("Impersonate-User", "bob"), token="kubernetes-token")
        self.assertEqual(self.upstream.review_connections(), [])
        [(mode, up, up_t)] = self.upstream.forwarded()
        self.assertEqual(mode, PASSTHROUGH)
        _, headers, _ = parse_forwarded(up_t.value())
        self.assertIn(("impersonate-user", "bob"), headers)


class RefusalTests(ImpersonationTestCase):
    def assertRefused(self, down, code, *texts, forwarded=0):
        status, body = self.status_of(down)
        self.assertEqual(status, code)
        self.assertEqual(body["kind"], "Status")
        for text in texts:
            self.assertIn(text, body["message"])
        self.assertEqual(len(self.upstream.forwarded()), forwarded, "nothing more forwarded")
        self.assertTrue(down.disconnecting)
        return body

    def test_any_denial_refuses_and_names_what(self):
        proto, down = self.send(("Impersonate-User", "bob"), ("Impersonate-Group", "admins"))
        self.upstream.answer(deny_groups)
        self.assertRefused(down, 403, "'alice' may not impersonate group 'admins'",
                           "cluster 'demo'")
        [record] = self.guard.audit.records
        self.assertEqual((record.decision, record.status, record.user), ("deny", 403, "alice"))
        self.assertEqual((record.impersonated_user, record.impersonated_groups),
                         ("bob", ["admins"]))

    def test_denials_are_not_cached(self):
        self.send(("Impersonate-User", "bob"))
        self.upstream.answer(lambda review: (False, "no rule"))
        proto, down = self.send(("Impersonate-User", "bob"))
        self.assertEqual(len(self.upstream.answer(allow_all)), 1)
        self.assertEqual(len(self.upstream.forwarded()), 1)

    def test_review_reason_is_shown(self):
        proto, down = self.send(("Impersonate-User", "root"))
        self.upstream.answer(lambda review: (False, "no RBAC policy matched"))
        self.assertRefused(down, 403, "user 'root'", "no RBAC policy matched")

    def test_guard_without_review_permission(self):
        proto, down = self.send(("Impersonate-User", "bob"))
        self.upstream.answer(allow_all, code=403)
        self.assertRefused(down, 502, "HTTP 403", "create' on subjectaccessreviews")
        self.assertEqual(self.guard.audit.records[0].decision, "error")

    def test_review_timeout(self):
        proto, down = self.send(("Impersonate-User", "bob"))
        self.clock.advance(sar.TIMEOUT)
        self.clock.advance(0)
        self.assertRefused(down, 502, "did not answer a SubjectAccessReview within 10 s")

    def test_api_server_unreachable(self):
        self.upstream.refuse = ConnectionRefusedError("connection refused")
        proto, down = self.send(("Impersonate-User", "bob"))
        self.assertRefused(down, 502, "cannot check whether 'alice' may impersonate 'bob'",
                           "https://api.test:6443")

    def test_closed_keep_alive_connection_is_retried_once(self):
        self.send(("Impersonate-User", "bob"))
        self.upstream.answer(allow_all)
        proto, down = self.send(("Impersonate-User", "carol"))
        [(_, kept, _, _)] = self.upstream.pending_reviews()
        kept.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.upstream.review_connections()), 2, "asked again, afresh")
        [(_, fresh, _, _)] = self.upstream.pending_reviews()
        fresh.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.upstream.review_connections()), 2, "but only once")
        self.assertRefused(down, 502, "could not be asked", forwarded=1)

    def test_answer_without_status(self):
        proto, down = self.send(("Impersonate-User", "bob"))
        [(_, protocol, _, _)] = self.upstream.pending_reviews()
        protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")
        self.assertRefused(down, 502, "no status.allowed")

    def test_oversized_answer(self):
        proto, down = self.send(("Impersonate-User", "bob"))
        [(_, protocol, _, _)] = self.upstream.pending_reviews()
        size = sar.MAX_ANSWER + 1
        protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n" % size)
        self.clock.advance(0)
        self.assertRefused(down, 502, "more than %d" % sar.MAX_ANSWER)

    def test_malformed_requests_are_refused_unasked(self):
        cases = [
            [("Impersonate-Group", "admins")],
            [("Impersonate-User", "a"), ("Impersonate-User", "b")],
            [("Impersonate-User", "")],
            [("Impersonate-User", "a"), ("Impersonate-Uid", "1"), ("Impersonate-Uid", "2")],
            [("Impersonate-User", "a"), ("Impersonate-Extra-bad%zz", "x")],
            [("Impersonate-User", "a"), ("Impersonate-Other", "x")],
            [("Impersonate-User", "a")] + [("Impersonate-Group", "g%d" % i)
                                           for i in range(sar.MAX_ATTRIBUTES)],
        ]
        for case in cases:
            proto, down = self.send(*case)
            self.assertRefused(down, 400, "guard of cluster 'demo'")
        self.assertEqual(self.upstream.connections, [])

    def test_refused_when_not_allowed_by_configuration(self):
        self.guard.allow_impersonation = False
        proto, down = self.send(("Impersonate-User", "bob"))
        self.assertRefused(down, 403, "not allowed through this guard")
        self.assertEqual(self.upstream.connections, [])

    def test_caller_gone_while_asking(self):
        proto, down = self.send(("Impersonate-User", "bob"))
        proto.connectionLost(None)
        self.upstream.answer(allow_all)
        self.assertEqual(self.upstream.forwarded(), [])
        self.assertEqual(self.guard.audit.records[0].status, 499)


class ParseTests(unittest.TestCase):
    def test_attributes_in_api_server_order(self):
        requested = sar.parse_requested([
            ("impersonate-user", "bob"), ("impersonate-group", "g"),
            ("impersonate-extra-a%2Fb", "1"), ("impersonate-extra-A%2fb", "2"),
            ("impersonate-uid", "u")])
        self.assertEqual(requested.extra, (("a/b", ("1", "2")),))
        self.assertEqual([a.describe() for a in requested.attributes()],
                         ["user 'bob'", "group 'g'", "extra 'a/b' value '1'",
                          "extra 'a/b' value '2'", "uid 'u'"])

    def test_malformed_service_account_name_is_a_user(self):
        for user in ("system:serviceaccount:ns", "system:serviceaccount::x",
                     "system:serviceaccount:ns:a:b"):
            attribute = sar.parse_requested([("impersonate-user", user)]).attributes()[0]
            self.assertEqual((attribute.resource, attribute.name), ("users", user))

    def test_review_body_keeps_authenticated_once(self):
        principal = Principal("u", ("system:authenticated", "g"))
        body = sar.review_body(principal, sar.Attribute("users", "x"))
        self.assertEqual(body["spec"]["groups"], ["system:authenticated", "g"])
        self.assertNotIn("extra", body["spec"])

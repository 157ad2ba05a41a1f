"""arc.tunnel.replicas: one dialer per relay address, following DNS (no sockets)."""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from arc.errors import ConfigError
from arc.tunnel.replicas import ReplicaDialers, replica_dialers
from arc.tunnel.settings import RelayLink


class FakeSession:
    closed = False
    draining = False

    def can_open(self):
        return not (self.closed or self.draining)


class FakeDialer(Service):
    def __init__(self, address):
        self.address = address
        self.session = None
        self.connects = 0
        self.last_error = None
        self.stopped = False

    def stopService(self):
        super().stopService()
        self.stopped = True

    def drain(self):
        return defer.succeed(None)


def link(**kw):
    values = dict(url="https://relay.example:443", server_name="relay.example", ca_pem=None,
                  credential=lambda: "t", transport="tunnel", websocket_mask=True,
                  resolve_interval=30.0)
    values.update(kw)
    return RelayLink(**values)


class ReplicaDialersTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.answers = []
        self.made = []

    def resolve(self, reactor, name):
        self.assertEqual(name, "relay.example")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    def make(self, address):
        dialer = FakeDialer(address)
        self.made.append(dialer)
        return dialer

    def service(self, **kw):
        service = ReplicaDialers(self.clock, link(**kw), self.make, resolve=self.resolve)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_explicit_addresses(self):
        service = self.service(addresses=("127.0.0.1", "127.0.0.2", "127.0.0.3"))
        self.assertEqual(sorted(service.dialers), ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        self.assertTrue(all(d.running for d in self.made))
        self.assertEqual(self.answers, [])      # nothing resolved

    def test_follows_the_names_addresses(self):
        self.answers = [["10.0.0.1", "10.0.0.2", "fd00::3"], ["10.0.0.2", "fd00::3", "10.0.0.4"]]
        service = self.service()
        self.assertEqual(sorted(service.dialers), ["10.0.0.1", "10.0.0.2", "fd00::3"])
        first = service.dialers["10.0.0.1"]
        self.clock.advance(30)
        self.assertEqual(sorted(service.dialers), ["10.0.0.2", "10.0.0.4", "fd00::3"])
        self.assertTrue(first.stopped)
        self.assertEqual(len(self.made), 4)      # the kept ones were not re-created

    def test_resolution_failure_keeps_the_known_replicas(self):
        self.answers = [["10.0.0.1"], OSError("SERVFAIL")]
        service = self.service()
        self.clock.advance(30)
        self.assertEqual(list(service.dialers), ["10.0.0.1"])
        self.assertIn("SERVFAIL", service.resolve_error)

    def test_first_resolution_failure_retries_soon(self):
        self.answers = [OSError("no such host"), ["10.0.0.1"]]
        service = self.service(reconnect_initial=0.5)
        self.assertEqual(service.dialers, {})
        self.assertIn("no such host", service.last_error)
        self.clock.advance(2)
        self.assertEqual(list(service.dialers), ["10.0.0.1"])

    def test_up_while_one_replica_is(self):
        service = self.service(addresses=("10.0.0.1", "10.0.0.2"))
        self.assertIsNone(service.session)
        self.assertIn("10.0.0.1: connecting", service.last_error)
        draining, up = FakeSession(), FakeSession()
        draining.draining = True
        service.dialers["10.0.0.1"].session = draining
        self.assertIs(service.session, draining)
        service.dialers["10.0.0.2"].session = up
        self.assertIs(service.session, up)
        self.assertEqual(service.state(), {"10.0.0.1": "draining", "10.0.0.2": "up"})
        self.assertEqual(service.tunnels_up, 1)

    def test_one_dialer_by_name_through_a_proxy(self):
        dialer = replica_dialers(self.clock, link(proxy="http://proxy:3128"), self.make)
        self.assertIsInstance(dialer, FakeDialer)
        self.assertIsNone(dialer.address)
        self.assertIsInstance(
            replica_dialers(self.clock, link(proxy="none"), self.make), ReplicaDialers)


class AddressesConfigTests(unittest.TestCase):
    def parse(self, relay):
        import os
        import tempfile

        import yaml

        from arc.config import load
        from arc.tunnel.settings import parse_relay_link
        path = os.path.join(tempfile.mkdtemp(), "agent.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"relay": dict({"url": "https://relay.example", "token_env": "HOME"},
                                          **relay)}, f)
        return parse_relay_link(load(path))

    def test_addresses(self):
        link = self.parse({"addresses": ["127.0.0.1", "[::1]", "127.0.0.1"],
                           "resolve_interval": 5})
        self.assertEqual(link.addresses, ("127.0.0.1", "::1"))
        self.assertEqual(link.resolve_interval, 5.0)
        self.assertEqual(link.server_name, "relay.example")

    def test_defaults(self):
        link = self.parse({})
        self.assertEqual((link.addresses, link.resolve_interval), ((), 30.0))

    def test_names_are_refused(self):
        e = self.assertRaises(ConfigError, self.parse, {"addresses": ["relay-0.example"]})
        self.assertIn("addresses", str(e))
        self.assertIn("IP addresses", str(e))


class FakeClient:
    def __init__(self):
        self.stopped = False

    def stopService(self):
        self.stopped = True
        return defer.succeed(None)


class TunnelSession(FakeSession):
    def __init__(self):
        self.on_goaway = self.on_close = None
        self.streams = {}
        self.remote_goaway = False

    def goAway(self):
        self.draining = True

    def whenIdle(self):
        return defer.succeed(None)


class FakeProtocol:
    def __init__(self, session):
        self.upgraded = defer.succeed(session)


class GoawayTests(unittest.TestCase):
    """The relay's GOAWAY: a replacement is dialed at once, the old tunnel drains."""

    def setUp(self):
        from arc.tunnel.dial import TunnelDialer
        self.clock = Clock()
        self.clients = []
        self.dialer = TunnelDialer(self.clock, relay_url="https://relay.example", path="/x",
                                   credential=lambda: "t", make_session=None,
                                   tls_options=None, backoff=lambda attempt: 0.3)
        self.dialer._new_client = self.new_client
        self.dialer.startService()

    def new_client(self):
        self.clients.append(FakeClient())
        return self.clients[-1]

    def up(self):
        session = TunnelSession()
        self.dialer._prepare(FakeProtocol(session))
        return session

    def test_replacement_dialed_while_the_old_tunnel_drains(self):
        old = self.up()
        old.remote_goaway = old.draining = True
        old.on_goaway(old, 0)
        self.assertEqual(len(self.clients), 1)
        self.clock.advance(0.3)
        self.assertEqual(len(self.clients), 2)           # dialing already
        self.assertFalse(self.clients[0].stopped)        # the old tunnel keeps its streams
        new = self.up()
        self.assertIs(self.dialer.session, new)
        old.closed = True
        old.on_close(old, 0, "drained")
        self.clock.advance(0)
        self.assertTrue(self.clients[0].stopped)         # and does not reconnect
        self.assertFalse(self.clients[1].stopped)

    def test_no_replacement_when_a_new_tunnel_came_first(self):
        old = self.up()
        old.on_goaway(old, 0)
        self.up()               # the old connection ended and reconnected by itself
        self.clock.advance(1)
        self.assertEqual(len(self.clients), 1)
        self.assertFalse(self.clients[0].stopped)

    def test_stop_cancels_the_replacement(self):
        old = self.up()
        old.on_goaway(old, 0)
        self.dialer.stopService()
        self.clock.advance(1)
        self.assertEqual(len(self.clients), 1)

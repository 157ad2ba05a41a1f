"""Tests for arc.relay.splice: client ⇄ relay ⇄ agent, frames forwarded undecoded."""

import json

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.trial import unittest

from arc.relay.splice import Half, pair
from arc.tunnel import frames as F
from arc.tunnel.session import Limits, RefuseStream, Session
from arc.tunnel.stream import Stream, StreamReset
from tests.test_session import Acceptor, Link, Recorder

W = F.INITIAL_WINDOW
MB = 1024 * 1024
AGENT_LABEL = "the agent of cluster 'demo'"


class Path:
    """client ⇄ relay (client session | agent session) ⇄ agent.

    The relay pairs streams the way ``Relay._client_open`` does: the client's
    stream gets one Half, a stream the relay opens on the agent's tunnel the
    other.
    """

    def __init__(self, agent_on_open=None, limits=Limits()):
        self.clock = Clock()
        self.ended = []
        self.agent_open = agent_on_open if agent_on_open is not None else Acceptor()
        self.client = Session(dialer=True, clock=self.clock, limits=limits, name="client")
        self.relay_client = Session(dialer=False, clock=self.clock, limits=limits,
                                    name="relay-client", on_open=self._client_open)
        self.relay_agent = Session(dialer=False, clock=self.clock, limits=limits,
                                   name="relay-agent")
        self.agent = Session(dialer=True, clock=self.clock, limits=limits, name="agent",
                             on_open=self.agent_open)
        self.client_link = Link(self.client, self.relay_client)
        self.agent_link = Link(self.agent, self.relay_agent)
        self.halves = []

    def _client_open(self, session, sid, metadata):
        meta = json.loads(metadata)
        client_half = Half(session, "the client", self.ended.append)
        client_half.id = sid
        agent_half = Half(self.relay_agent, AGENT_LABEL)
        pair(client_half, agent_half)
        forwarded = json.dumps({"cluster": meta["cluster"], "user": "alice",
                                "groups": ["dev"], "request": None}).encode()
        agent_half.id = self.relay_agent.open(agent_half, forwarded)
        self.halves.append((client_half, agent_half))
        return client_half

    def pump(self):
        for _ in range(100000):
            moved = False
            for link in (self.client_link, self.agent_link):
                for side in (link.a, link.b):
                    moved |= link.deliver(side)
            if not moved:
                break
        self.client_link.pump()
        self.agent_link.pump()

    def open(self, write=b"", pump=True):
        stream = Stream(self.client)
        stream.opened(self.client.open(stream, b'{"cluster": "demo"}'), 30)
        proto = Recorder()
        stream.attach(proto)
        if write:
            stream.write(write)
        if pump:
            self.pump()
        return stream, proto

    def remote(self, index=-1):
        stream, proto, metadata = self.agent_open.opened[index]
        return stream, proto

    def relay_streams(self):
        return len(self.relay_client.streams) + len(self.relay_agent.streams)


class SpliceTests(unittest.TestCase):
    def setUp(self):
        self.path = Path()

    def test_open_metadata_ack_and_optimistic_data(self):
        p = self.path
        stream, proto = p.open(write=b"GET /api HTTP/1.1\r\n\r\n", pump=False)
        self.assertFalse(stream.acked)
        p.pump()
        self.assertTrue(stream.acked)
        remote, rproto = p.remote()
        self.assertEqual(json.loads(remote.metadata),
                         {"cluster": "demo", "user": "alice", "groups": ["dev"],
                          "request": None})
        self.assertEqual(bytes(rproto.data), b"GET /api HTTP/1.1\r\n\r\n")
        self.assertEqual(stream.id % 2, 1)
        self.assertEqual(remote.id % 2, 0)
        # The ACK the agent sent reached the client through the relay.
        [ack] = p.client_link.sent_types(p.relay_client, F.WINDOW_UPDATE, F.ACK)
        self.assertEqual(ack[2], stream.id)

    def test_bytes_both_ways_with_window_updates(self):
        p = self.path
        stream, proto = p.open()
        remote, rproto = p.remote()
        up = bytes(range(251)) * 8000           # ~2 MB, many windows
        down = bytes(range(241)) * 9000
        stream.write(up)
        remote.write(down)
        p.pump()
        self.assertEqual(bytes(rproto.data), up)
        self.assertEqual(bytes(proto.data), down)
        # Credit the agent returned passed through the relay to the client...
        agent_updates = [f[3] for f in p.agent_link.sent_types(p.agent, F.WINDOW_UPDATE)
                         if not f[1] & F.ACK]
        relayed = [f[3] for f in p.client_link.sent_types(p.relay_client, F.WINDOW_UPDATE)
                   if not f[1] & F.ACK]
        self.assertGreater(len(agent_updates), 4)
        self.assertEqual(relayed, agent_updates)
        # ...and the other way.
        client_updates = [f[3] for f in p.client_link.sent_types(p.client, F.WINDOW_UPDATE)]
        relayed = [f[3] for f in p.agent_link.sent_types(p.relay_agent, F.WINDOW_UPDATE)]
        self.assertGreater(len(client_updates), 4)
        self.assertEqual(relayed, client_updates)
        client_half, agent_half = p.halves[0]
        self.assertEqual(client_half.bytes, len(up))
        self.assertEqual(agent_half.bytes, len(down))
        # Payloads are forwarded as they came: same frame sizes on both hops.
        sizes_in = [f[3] for f in p.client_link.sent_types(p.client, F.DATA)
                    if not f[1] & F.SYN]
        sizes_out = [f[3] for f in p.agent_link.sent_types(p.relay_agent, F.DATA)
                     if not f[1] & F.SYN]
        self.assertEqual(sizes_in, sizes_out)

    def test_backpressure_end_to_end(self):
        p = self.path
        stream, proto = p.open()
        remote, rproto = p.remote()
        remote.pauseProducing()
        stream.write(b"x" * (2 * MB))
        p.pump()
        self.assertEqual(len(rproto.data), W)
        self.assertEqual(stream.buffered, 2 * MB - W)
        remote.resumeProducing()
        p.pump()
        self.assertEqual(len(rproto.data), 2 * MB)
        self.assertEqual(stream.buffered, 0)

    def test_fin_both_ways_removes_both_halves(self):
        p = self.path
        stream, proto = p.open(write=b"request")
        remote, rproto = p.remote()
        self.assertEqual(p.relay_streams(), 2)
        stream.loseConnection()
        p.pump()
        self.assertTrue(rproto.eof)
        self.assertEqual(p.relay_streams(), 2)
        remote.write(b"response")
        remote.loseConnection()
        p.pump()
        self.assertEqual(bytes(proto.data), b"response")
        self.assertTrue(proto.lost.check(error.ConnectionDone))
        self.assertTrue(rproto.lost.check(error.ConnectionDone))
        self.assertEqual(p.relay_client.streams, {})
        self.assertEqual(p.relay_agent.streams, {})
        self.assertEqual(p.client.streams, {})
        self.assertEqual(p.agent.streams, {})
        self.assertEqual(p.ended, [p.halves[0][0]])

    def test_agent_reset_reaches_client(self):
        p = self.path
        stream, proto = p.open(write=b"GET / HTTP/1.1\r\n\r\n")
        remote, rproto = p.remote()
        remote.reset(F.UPSTREAM_UNREACHABLE, "agent of cluster 'demo' cannot reach the API "
                                             "server 10.0.0.1:6443: connection refused")
        p.pump()
        exc = proto.lost.value
        self.assertIsInstance(exc, StreamReset)
        self.assertEqual(exc.code, F.UPSTREAM_UNREACHABLE)
        self.assertEqual(exc.reason, "agent of cluster 'demo' cannot reach the API server "
                                     "10.0.0.1:6443: connection refused")
        self.assertEqual(p.relay_streams(), 0)
        self.assertEqual(len(p.ended), 1)

    def test_client_reset_reaches_agent(self):
        p = self.path
        stream, proto = p.open()
        remote, rproto = p.remote()
        stream.reset(F.CANCELLED, "the connection from kubectl was closed")
        p.pump()
        self.assertEqual(rproto.lost.value.code, F.CANCELLED)
        self.assertEqual(rproto.lost.value.reason, "the connection from kubectl was closed")
        self.assertEqual(p.relay_streams(), 0)

    def test_agent_refusal_reaches_client(self):
        self.path = p = Path(agent_on_open=Acceptor(
            refuse=RefuseStream(F.FORBIDDEN, "impersonation denied")))
        stream, proto = p.open(write=b"early data")
        self.assertEqual(proto.lost.value.code, F.FORBIDDEN)
        self.assertEqual(proto.lost.value.reason, "impersonation denied")
        self.assertEqual(p.relay_streams(), 0)
        self.assertFalse(p.relay_agent.closed or p.agent.closed)

    def test_agent_tunnel_lost(self):
        p = self.path
        streams = [p.open(write=b"q") for _ in range(3)]
        agents = [p.remote(i) for i in range(3)]
        p.relay_agent.connectionLost("connection reset by peer")
        p.agent.connectionLost("connection reset by peer")
        p.pump()
        for stream, proto in streams:
            exc = proto.lost.value
            self.assertEqual(exc.code, F.TUNNEL_LOST)
            self.assertIn(AGENT_LABEL, exc.reason)
            self.assertIn("lost its tunnel to the relay", exc.reason)
            self.assertIn("connection reset by peer", exc.reason)
        self.assertEqual(p.relay_client.streams, {})
        self.assertFalse(p.client.closed)
        self.assertFalse(p.relay_client.closed)
        self.assertEqual(len(p.ended), 3)
        # The agent, told by its own carrier, resets its side too.
        for remote, rproto in agents:
            self.assertEqual(rproto.lost.value.code, F.TUNNEL_LOST)

    def test_agent_declared_dead(self):
        p = self.path = Path(limits=Limits(ping_interval=15, dead_after=45))
        stream, proto = p.open()
        p.agent_link.muted.add(p.agent)
        for _ in range(5):
            p.clock.advance(15)
            p.pump()
        self.assertTrue(p.relay_agent.closed)
        self.assertEqual(proto.lost.value.code, F.TUNNEL_LOST)
        self.assertIn(AGENT_LABEL, proto.lost.value.reason)
        self.assertFalse(p.client.closed)

    def test_client_tunnel_lost(self):
        p = self.path
        stream, proto = p.open()
        remote, rproto = p.remote()
        p.relay_client.connectionLost("client went away")
        p.pump()
        self.assertEqual(rproto.lost.value.code, F.TUNNEL_LOST)
        self.assertIn("the client lost its tunnel to the relay", rproto.lost.value.reason)
        self.assertEqual(p.relay_agent.streams, {})
        self.assertFalse(p.agent.closed)
        self.assertEqual(len(p.ended), 1)

    def test_credit_violation_resets_both_sides(self):
        p = self.path
        stream, proto = p.open()
        remote, rproto = p.remote()
        # The client ignores its window (bypassing Stream's accounting).
        p.client.send_frame(F.DATA, 0, stream.id, 200000, b"y" * 200000)
        p.client.send_frame(F.DATA, 0, stream.id, 100000, b"y" * 100000)
        p.pump()
        self.assertEqual(proto.lost.value.code, F.FLOW_CONTROL_ERROR)
        self.assertEqual(rproto.lost.value.code, F.FLOW_CONTROL_ERROR)
        self.assertIn("flow-control window", rproto.lost.value.reason)
        # The relay forwarded what was within credit and nothing beyond.
        self.assertEqual(len(rproto.data), 200000)
        self.assertEqual(p.relay_streams(), 0)
        self.assertEqual(len(p.ended), 1)
        self.assertFalse(p.relay_client.closed or p.relay_agent.closed)

    def test_credit_includes_extra_window_from_ack(self):
        p = self.path = Path(agent_on_open=Acceptor(window=2 * W))
        stream, proto = p.open()
        remote, rproto = p.remote()
        client_half, agent_half = p.halves[0]
        self.assertEqual(client_half.credit, 2 * W)
        remote.pauseProducing()
        stream.write(b"z" * (3 * W))
        p.pump()
        self.assertEqual(len(rproto.data), 2 * W)
        self.assertIsNone(proto.lost)

    def test_late_frames_after_end_dropped(self):
        p = self.path
        stream, proto = p.open()
        remote, rproto = p.remote()
        sid = stream.id
        remote.reset(F.CANCELLED, "x")
        p.pump()
        forwarded = len(p.agent_link.sent[p.relay_agent])
        p.client.send_frame(F.DATA, 0, sid, 3, b"abc")
        p.client.send_frame(F.WINDOW_UPDATE, 0, sid, 10)
        p.pump()
        self.assertFalse(p.relay_client.closed)
        self.assertEqual(len(p.agent_link.sent[p.relay_agent]), forwarded)


class RelayDrainTests(unittest.TestCase):
    def test_reset_streams_resets_both_ends_of_each_pair(self):
        p = Path(limits=Limits(ping_interval=0))
        stream, proto = p.open(write=b"x")
        remote, rproto = p.remote()
        other, other_proto = p.open()
        p.relay_client.reset_streams(F.GOING_AWAY, "the relay is stopping")
        # Resetting a pair already reset through its other half does nothing.
        p.relay_agent.reset_streams(F.GOING_AWAY, "again")
        p.pump()
        for lost in (proto.lost, rproto.lost, other_proto.lost):
            self.assertEqual(lost.value.code, F.GOING_AWAY)
            self.assertEqual(lost.value.reason, "the relay is stopping")
        self.assertEqual(p.relay_client.streams, {})
        self.assertEqual(p.relay_agent.streams, {})
        self.assertEqual(p.agent.streams, {})
        self.assertEqual(p.client.streams, {})
        self.assertEqual(len(p.ended), 2)
        resets = p.client_link.sent_types(p.relay_client, F.DATA, F.RST)
        self.assertEqual(len(resets), 2)

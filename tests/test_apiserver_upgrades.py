"""Tests for the emulator's upgraded connections: SPDY, exec, attach, port-forward, cp.

The sans-I/O parts (L{arc.testing.spdy}, L{arc.testing.spdysession},
L{arc.testing.spdyexec}, L{arc.testing.portforward},
L{arc.testing.execfiles}) are driven with frames in memory; the rest runs
real kubectl builds against the emulator as a process: 1.33 over WebSocket
and, with the ``KUBECTL_*_WEBSOCKETS=false`` switches, over SPDY, and 1.29,
which speaks SPDY only.
"""

import io
import json
import os
import re
import struct
import tarfile
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from arc.testing import execsession, spdy
from arc.testing.execfiles import PodFiles
from arc.testing.execsession import ExecSession, commandFor
from arc.testing.portforward import PortForwardHandler
from arc.testing.spdyexec import RemoteCommandHandler, expectedStreams
from arc.testing.spdysession import MAX_DATA, SpdySession
from tests.test_apiserver import NO_KUBECTL, EmulatorProcessMixin, findKubectl

KUBECTL_1_29 = findKubectl("1.29")
KUBECTL_1_33 = findKubectl("1.33")
SPDY_EXEC = {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}
SPDY_PORT_FORWARD = {"KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}

# The first bytes kubectl 1.29 sent for ``exec ticker -- echo hi``: three
# SYN_STREAMs (error, stdout, stderr) whose header blocks share one zlib
# stream primed with the SPDY/3 dictionary.
KUBECTL_SYN_STREAMS = bytes.fromhex(
    "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c"
    "6851c29a0a0a6800000000ffff800300010000001900000003000000000000c22ac5565c"
    "92925f5a02000000ffff800300010000001500000005000000000000c229975a54040000"
    "00ffff"
)

EVERY_FRAME = [
    spdy.SynStream(1, (("streamtype", "error"), ("port", "8080"), ("requestid", "0"))),
    spdy.SynStream(3, (("a", "1"), ("a", "2")), associatedTo=1, priority=3, slot=2, fin=True),
    spdy.SynStream(5, (), unidirectional=True),
    spdy.SynReply(1, ()),
    spdy.SynReply(3, (("status", "200 OK"),), fin=True),
    spdy.Headers(1, (("x", "y"),), fin=True),
    spdy.DataFrame(1, b"payload"),
    spdy.DataFrame(3, b"", fin=True),
    spdy.DataFrame(spdy.MAX_STREAM_ID, bytes(range(256)) * 8),
    spdy.RstStream(5, spdy.CANCEL),
    spdy.Settings(((0, 4, 100), (1, 7, 65536)), clear=True),
    spdy.Ping(1),
    spdy.GoAway(5, spdy.GOAWAY_PROTOCOL_ERROR),
    spdy.WindowUpdate(0, 65536),
]


def encodeAll(frames, encoder=None):
    encoder = encoder or spdy.FrameEncoder()
    return b"".join(encoder.encode(frame) for frame in frames)


class CodecTests(SynchronousTestCase):
    """L{spdy.FrameEncoder} and L{spdy.FrameDecoder}."""

    def test_roundTrip(self):
        """Every frame type comes back as it was encoded."""
        decoder = spdy.FrameDecoder()
        self.assertEqual(decoder.feed(encodeAll(EVERY_FRAME)), EVERY_FRAME)
        self.assertEqual(decoder.buffered, 0)

    def test_layout(self):
        """Control frames start with version 3 and the type; data frames with the stream."""
        encoder = spdy.FrameEncoder()
        self.assertEqual(
            encoder.encode(spdy.Ping(7)), bytes.fromhex("80030006 00000004 00000007")
        )
        self.assertEqual(
            encoder.encode(spdy.DataFrame(3, b"hi", fin=True)),
            bytes.fromhex("00000003 01000002") + b"hi",
        )
        self.assertEqual(
            encoder.encode(spdy.RstStream(3, spdy.REFUSED_STREAM)),
            bytes.fromhex("80030003 00000008 00000003 00000003"),
        )

    def test_dictionary(self):
        """The dictionary is the specification's: its Adler-32 is what kubectl names."""
        self.assertEqual(len(spdy.DICTIONARY), 1423)
        self.assertTrue(spdy.DICTIONARY.startswith(b"\0\0\0\x07options\0\0\0\x04head"))
        self.assertTrue(spdy.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0."))
        dictId = KUBECTL_SYN_STREAMS[20:24]
        self.assertEqual(struct.unpack("!I", dictId)[0], zlib.adler32(spdy.DICTIONARY))

    def test_kubectlHeaderBlocks(self):
        """Header blocks kubectl compressed decode, each with the context of the ones before."""
        frames = spdy.FrameDecoder().feed(KUBECTL_SYN_STREAMS)
        self.assertEqual(
            [(f.streamId, f.headers) for f in frames],
            [
                (1, (("streamtype", "error"),)),
                (3, (("streamtype", "stdout"),)),
                (5, (("streamtype", "stderr"),)),
            ],
        )

    def test_compressionContextSpansFrames(self):
        """Later header blocks lean on earlier ones and cannot be read alone."""
        headers = (("streamtype", "data"), ("port", "8080"), ("requestid", "1"))
        encoder = spdy.FrameEncoder()
        wires = [encoder.encode(spdy.SynStream(i, headers)) for i in (1, 3, 5)]
        self.assertLess(len(wires[1]), len(wires[0]))
        self.assertEqual(
            [f.headers for f in spdy.FrameDecoder().feed(b"".join(wires))], [headers] * 3
        )
        self.assertRaises(spdy.ProtocolError, spdy.FrameDecoder().feed, wires[1])

    def test_dictionaryPrimesFirstBlock(self):
        """The first block names the dictionary in its zlib header (FDICT)."""
        wire = spdy.FrameEncoder().encode(spdy.SynReply(1, (("status", "200 OK"),)))
        zlibHeader = wire[12:18]
        self.assertTrue(zlibHeader[1] & 0x20)
        self.assertEqual(struct.unpack("!I", zlibHeader[2:])[0], zlib.adler32(spdy.DICTIONARY))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=0), max_size=12))
    def test_anySplit(self, cuts):
        """Bytes cut anywhere decode to the same frames."""
        wire = encodeAll(EVERY_FRAME)
        points = sorted({c % (len(wire) + 1) for c in cuts}) + [len(wire)]
        decoder, frames, last = spdy.FrameDecoder(), [], 0
        for point in points:
            frames += decoder.feed(wire[last:point])
            last = point
        self.assertEqual(frames, EVERY_FRAME)

    def test_unknownControlFrameSkipped(self):
        unknown = bytes.fromhex("8003000f 00000002 abcd")
        frames = spdy.FrameDecoder().feed(unknown + encodeAll([spdy.Ping(3)]))
        self.assertEqual(frames, [spdy.Ping(3)])

    def test_errors(self):
        """Other versions, short frames and corrupt header blocks are protocol errors."""
        for wire in (
            bytes.fromhex("80020006 00000004 00000001"),
            bytes.fromhex("80030006 00000002 0000"),
            bytes.fromhex("80030002 00000008 00000001 deadbeef"),
        ):
            self.assertRaises(spdy.ProtocolError, spdy.FrameDecoder().feed, wire)


class ClientEnd:
    """The client's end of a L{SpdySession}: frames in, frames out, in memory."""

    def __init__(self, makeHandler):
        self._encoder = spdy.FrameEncoder()
        self._decoder = spdy.FrameDecoder()
        self.received = []
        self.disconnected = False
        self.session = SpdySession(makeHandler, self._write, self._disconnect)

    def _write(self, data):
        self.received += self._decoder.feed(data)

    def _disconnect(self):
        self.disconnected = True

    def send(self, *frames):
        self.session.dataReceived(encodeAll(frames, self._encoder))

    def take(self):
        frames, self.received = self.received, []
        return frames


class Recorder:
    """A session handler that notes what happens."""

    def __init__(self, session):
        self.events = []
        self.streams = {}

    def streamOpened(self, stream):
        self.streams[stream.streamId] = stream
        self.events.append(("opened", stream.streamId, stream.header("streamtype")))

    def streamDataReceived(self, stream, data):
        self.events.append(("data", stream.streamId, data))

    def streamEnded(self, stream):
        self.events.append(("ended", stream.streamId))

    def connectionLost(self):
        self.events.append(("lost",))


class SessionTests(SynchronousTestCase):
    """L{SpdySession}: stream bookkeeping, pings, going away."""

    def setUp(self):
        self.client = ClientEnd(Recorder)
        self.handler = self.client.session.handler

    def test_streamsAreAccepted(self):
        """Each SYN_STREAM gets a SYN_REPLY; data and FIN reach the handler."""
        self.client.send(
            spdy.SynStream(1, (("streamtype", "stdin"),)),
            spdy.DataFrame(1, b"abc"),
            spdy.DataFrame(1, b"", fin=True),
        )
        self.assertEqual(self.client.take(), [spdy.SynReply(1)])
        self.assertEqual(
            self.handler.events, [("opened", 1, "stdin"), ("data", 1, b"abc"), ("ended", 1)]
        )

    def test_sendAndFinish(self):
        """Data goes out in frames of at most MAX_DATA bytes; finish sends FIN."""
        self.client.send(spdy.SynStream(1, ()))
        self.client.take()
        stream = self.handler.streams[1]
        self.client.session.send(stream, b"x" * (MAX_DATA + 1))
        self.client.session.finish(stream)
        self.client.session.send(stream, b"late")
        self.assertEqual(
            self.client.take(),
            [
                spdy.DataFrame(1, b"x" * MAX_DATA),
                spdy.DataFrame(1, b"x"),
                spdy.DataFrame(1, b"", fin=True),
            ],
        )

    def test_closedStreamIsForgotten(self):
        """Data for a stream closed both ways is answered with RST_STREAM."""
        self.client.send(spdy.SynStream(1, (), fin=True))
        self.client.session.finish(self.handler.streams[1])
        self.client.take()
        self.client.send(spdy.DataFrame(1, b"more"))
        self.assertEqual(self.client.take(), [spdy.RstStream(1, spdy.INVALID_STREAM)])

    def test_pings(self):
        """The client's pings (odd ids) are echoed."""
        self.client.send(spdy.Ping(1), spdy.Ping(2))
        self.assertEqual(self.client.take(), [spdy.Ping(1)])

    def test_streamIdsMustGrow(self):
        self.client.send(spdy.SynStream(3, ()), spdy.SynStream(1, ()), spdy.SynStream(4, ()))
        self.assertEqual(
            self.client.take(),
            [
                spdy.SynReply(3),
                spdy.RstStream(1, spdy.PROTOCOL_ERROR),
                spdy.RstStream(4, spdy.PROTOCOL_ERROR),
            ],
        )

    def test_goAwayWaitsForStreams(self):
        """After GOAWAY the connection closes once the last stream is closed."""
        self.client.send(spdy.SynStream(1, ()))
        self.client.session.goAway()
        self.client.send(spdy.SynStream(3, ()))
        self.assertEqual(
            self.client.take(),
            [spdy.SynReply(1), spdy.GoAway(1), spdy.RstStream(3, spdy.REFUSED_STREAM)],
        )
        self.client.session.finish(self.handler.streams[1])
        self.assertFalse(self.client.disconnected)
        self.client.send(spdy.DataFrame(1, b"", fin=True))
        self.assertTrue(self.client.disconnected)
        self.assertEqual(self.handler.events[-1], ("lost",))

    def test_protocolError(self):
        """Garbage ends the connection with a GOAWAY naming a protocol error."""
        self.client.session.dataReceived(bytes.fromhex("80020001 00000000"))
        self.assertEqual(self.client.take(), [spdy.GoAway(0, spdy.GOAWAY_PROTOCOL_ERROR)])
        self.assertTrue(self.client.disconnected)


def streamTypes(*types):
    return [spdy.SynStream(1 + 2 * i, (("streamtype", t),)) for i, t in enumerate(types)]


class RemoteCommandTests(SynchronousTestCase):
    """L{RemoteCommandHandler}: an exec session on SPDY streams."""

    def connect(self, argv, stdin=False):
        def newSession(send, close):
            command = commandFor(argv, "alice", PodFiles("pod"))
            return ExecSession(argv, command, send, close, stdin=stdin)

        expected = expectedStreams(stdin, True, True, False)
        return ClientEnd(lambda session: RemoteCommandHandler(session, newSession, expected))

    def test_catOverStreams(self):
        """stdin is copied to the stdout stream; the status goes on the error stream."""
        client = self.connect(["cat"], stdin=True)
        client.send(*streamTypes("error", "stdin", "stdout"))
        self.assertIsNone(client.session.handler.exec, "started without a stderr stream")
        client.send(spdy.DataFrame(3, b"early"), spdy.SynStream(7, (("streamtype", "stderr"),)))
        client.send(spdy.DataFrame(3, b"late", fin=True))
        frames = [f for f in client.take() if not isinstance(f, spdy.SynReply)]
        self.assertEqual(frames[:2], [spdy.DataFrame(5, b"early"), spdy.DataFrame(5, b"late")])
        self.assertEqual(json.loads(frames[2].data), {"metadata": {}, "status": "Success"})
        self.assertEqual(frames[2].streamId, 1)
        self.assertEqual(
            frames[3:],
            [spdy.DataFrame(i, b"", fin=True) for i in (1, 3, 5, 7)] + [spdy.GoAway(7)],
        )

    def test_exitCode(self):
        client = self.connect(["sh", "-c", "exit 3"])
        client.send(*streamTypes("error", "stdout", "stderr"))
        [status] = [f for f in client.take() if isinstance(f, spdy.DataFrame) and f.data]
        self.assertEqual(status.streamId, 1)
        causes = json.loads(status.data)["details"]["causes"]
        self.assertEqual(causes, [{"reason": "ExitCode", "message": "3"}])

    def test_unknownStreamRefused(self):
        client = self.connect(["true"])
        client.send(*streamTypes("error", "bogus"))
        self.assertIn(spdy.RstStream(3, spdy.REFUSED_STREAM), client.take())


def portForwardStreams(port, requestId="0", first=1):
    headers = (("port", str(port)), ("requestid", requestId))
    return [
        spdy.SynStream(first, (("streamtype", "error"),) + headers),
        spdy.SynStream(first + 2, (("streamtype", "data"),) + headers),
    ]


class PortForwardTests(SynchronousTestCase):
    """L{PortForwardHandler}: stream pairs to the pod's emulated services."""

    def setUp(self):
        self.client = ClientEnd(lambda session: PortForwardHandler(session, "ticker", "u-1"))

    def dataFrames(self):
        return [f for f in self.client.take() if isinstance(f, spdy.DataFrame)]

    def test_http(self):
        """Port 8080 answers ``GET /``; then both streams are half-closed."""
        self.client.send(*portForwardStreams(8080))
        self.client.send(spdy.DataFrame(3, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        answer, *fins = self.dataFrames()
        self.assertEqual(answer.streamId, 3)
        self.assertTrue(answer.data.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(answer.data.endswith(b"\r\n\r\nhello from ticker:8080\n"))
        self.assertEqual(fins, [spdy.DataFrame(3, b"", fin=True), spdy.DataFrame(1, b"", fin=True)])

    def test_connectionsAreIndependent(self):
        """Each request id is its own connection, answered on its own data stream."""
        self.client.send(*portForwardStreams(8080, "0"), *portForwardStreams(8080, "1", 5))
        self.client.send(spdy.DataFrame(7, b"GET /missing HTTP/1.0\r\n\r\n"))
        self.assertTrue(self.dataFrames()[0].data.startswith(b"HTTP/1.1 404 Not Found"))
        self.client.send(spdy.DataFrame(3, b"POST / HTTP/1.0\r\n\r\n"))
        self.assertTrue(self.dataFrames()[0].data.startswith(b"HTTP/1.1 405"))

    def test_closedPort(self):
        """Other ports get the kubelet's kind of message on the error stream."""
        self.client.send(*portForwardStreams(9999))
        message, *fins = self.dataFrames()
        self.assertEqual(message.streamId, 1)
        self.assertIn(b"error forwarding port 9999 to pod ticker, uid u-1", message.data)
        self.assertEqual(len(fins), 2)


def archive(members):
    """A tar archive of C{members}: name to content (C{None} for a directory)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class FileCommandTests(SynchronousTestCase):
    """``tar``, ``test`` and ``cat FILE`` on a pod's L{PodFiles}."""

    def setUp(self):
        self.files = PodFiles("pod")

    def execute(self, *argv, stdin=None):
        """Run C{argv}; return (exit code, stdout, stderr)."""
        out = {execsession.STDOUT: b"", execsession.STDERR: b""}
        status = []

        def send(message):
            if message[0] == execsession.STATUS:
                status.append(json.loads(message[1:]))
            else:
                out[message[0]] += message[1:]

        command = commandFor(list(argv), "alice", self.files)
        session = ExecSession(argv, command, send, lambda: None, stdin=stdin is not None)
        session.start()
        if stdin is not None:
            session.messageReceived(bytes([execsession.STDIN]) + stdin)
            session.messageReceived(bytes([execsession.CLOSE, execsession.STDIN]))
        return session.exitCode, out[execsession.STDOUT], out[execsession.STDERR]

    def test_extractThenCreate(self):
        """What ``kubectl cp`` runs to copy in, then out, keeps files and directories."""
        tar = archive({"d": None, "d/a": b"A", "d/sub/b": b"B" * 20000})
        self.assertEqual(self.execute("tar", "-xmf", "-", "-C", "/tmp", stdin=tar), (0, b"", b""))
        self.assertEqual(self.execute("test", "-d", "/tmp/d/sub")[0], 0)
        self.assertEqual(self.execute("test", "-d", "/tmp/d/a")[0], 1)
        self.assertEqual(self.execute("cat", "/tmp/d/a"), (0, b"A", b""))
        code, out, err = self.execute("tar", "cf", "-", "/tmp/d")
        self.assertEqual((code, err), (0, b""))
        with tarfile.open(fileobj=io.BytesIO(out)) as tar:
            contents = {
                m.name: tar.extractfile(m).read() if m.isfile() else None for m in tar
            }
        self.assertEqual(
            contents,
            {"tmp/d": None, "tmp/d/a": b"A", "tmp/d/sub": None, "tmp/d/sub/b": b"B" * 20000},
        )

    def test_noPreserveOptions(self):
        """``cp --no-preserve`` adds options that are accepted."""
        tar = archive({"f": b"x"})
        command = ("tar", "--no-same-permissions", "--no-same-owner", "-xmf", "-", "-C", "/tmp")
        self.assertEqual(self.execute(*command, stdin=tar)[0], 0)
        self.assertEqual(self.execute("cat", "/tmp/f")[1], b"x")

    def test_errors(self):
        self.assertEqual(
            self.execute("tar", "cf", "-", "/nope")[::2],
            (1, b"tar: can't open '/nope': No such file or directory\n"),
        )
        self.assertEqual(
            self.execute("tar", "xf", "-", "-C", "/nope", stdin=archive({}))[::2],
            (1, b"tar: can't change directory to '/nope': No such file or directory\n"),
        )
        self.assertEqual(self.execute("tar", "czf", "-", "/tmp")[0], 1)
        self.assertEqual(self.execute("tar", "cf", "/tmp/out.tar", "/tmp")[0], 1)
        self.assertEqual(
            self.execute("cat", "/etc/hostname", "/nope"),
            (1, b"pod\n", b"cat: can't open '/nope': No such file or directory\n"),
        )


class PortForwardClient(Protocol):
    """Send one HTTP request; collect the answer until the connection closes."""

    def __init__(self, request):
        self._request = request
        self.answer = b""
        self.done = Deferred(lambda d: self.transport.abortConnection())

    def connectionMade(self):
        self.transport.write(self._request)

    def dataReceived(self, data):
        self.answer += data

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(self.answer)


@inlineCallbacks
def httpGet(port, path="/"):
    """The raw answer to ``GET path`` on 127.0.0.1:C{port}, within 10 s."""
    client = PortForwardClient(
        b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % (path.encode(),)
    )
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    answer = yield client.done.addTimeout(10, reactor)
    return answer


class KubectlUpgradeTests(EmulatorProcessMixin, TestCase):
    """exec, attach, port-forward and cp with real kubectl builds."""

    skip = NO_KUBECTL or (None if KUBECTL_1_33 else "kubectl.1.33 is not installed")

    def lastUpgrade(self, subresource):
        """C{(upgrade, code, protocol)} of the last request to C{subresource}."""
        records = [r for r in self.requests() if r["path"].endswith("/" + subresource)]
        return records[-1]["upgrade"], records[-1]["code"], records[-1]["protocol"]

    def needOldKubectl(self):
        if KUBECTL_1_29 is None:
            raise self.skipTest("kubectl.1.29 is not installed")

    @inlineCallbacks
    def checkExec(self, binary, env=None):
        """stdout, stdin and the exit code of ``exec``."""
        echo = yield self.kubectl("exec", "ticker", "--", "echo", "hi", binary=binary, env=env)
        self.assertEqual((echo.code, echo.out), (0, b"hi\n"), echo.describe())
        cat = yield self.kubectl(
            "exec", "-i", "ticker", "--", "cat", stdin=b"one\ntwo\n", binary=binary, env=env
        )
        self.assertEqual((cat.code, cat.out), (0, b"one\ntwo\n"), cat.describe())
        fail = yield self.kubectl(
            "exec", "ticker", "--", "sh", "-c", "exit 3", binary=binary, env=env
        )
        self.assertEqual(fail.code, 3, fail.describe())
        self.assertIn(b"command terminated with exit code 3", fail.err)

    @inlineCallbacks
    def test_execSpdy(self):
        """kubectl 1.33 told to use SPDY gets protocol v4 and the same results."""
        yield self.checkExec(KUBECTL_1_33, SPDY_EXEC)
        self.assertEqual(self.lastUpgrade("exec"), ("spdy/3.1", 101, "v4.channel.k8s.io"))

    @inlineCallbacks
    def test_execOldKubectl(self):
        """kubectl 1.29 speaks SPDY only."""
        self.needOldKubectl()
        yield self.checkExec(KUBECTL_1_29)
        self.assertEqual(self.lastUpgrade("exec")[0], "spdy/3.1")

    @inlineCallbacks
    def checkAttach(self, binary, env=None):
        child = yield self.kubectl(
            "attach", "-i", "ticker", stdin=b"hello\nworld\n", binary=binary, env=env
        )
        self.assertEqual((child.code, child.out), (0, b"hello\nworld\n"), child.describe())

    @inlineCallbacks
    def test_attachWebSocket(self):
        """``attach -i``: the pod's main process echoes stdin lines."""
        yield self.checkAttach(KUBECTL_1_33)
        self.assertEqual(self.lastUpgrade("attach"), ("websocket", 101, "v5.channel.k8s.io"))

    @inlineCallbacks
    def test_attachSpdy(self):
        self.needOldKubectl()
        yield self.checkAttach(KUBECTL_1_29)
        self.assertEqual(self.lastUpgrade("attach"), ("spdy/3.1", 101, "v4.channel.k8s.io"))

    @inlineCallbacks
    def portForward(self, binary, env=None, remote=8080):
        """Start ``port-forward pod/ticker :REMOTE``; return it and its local port."""
        child = self.kubectlStream(
            "port-forward", "--address", "127.0.0.1", "pod/ticker", f":{remote}",
            binary=binary, env=env,
        )  # fmt: skip
        pattern = re.compile(rb"Forwarding from 127\.0\.0\.1:(\d+) -> %d" % (remote,))
        yield child.waitFor(lambda c: pattern.search(c.out), 10, "port-forward to listen")
        return child, int(pattern.search(child.out).group(1))

    @inlineCallbacks
    def checkPortForward(self, binary, env=None):
        """Two requests through one port-forward reach the pod's HTTP port."""
        child, port = yield self.portForward(binary, env)
        for _ in range(2):
            answer = yield httpGet(port)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
            self.assertTrue(answer.endswith(b"\r\n\r\nhello from ticker:8080\n"), answer)
        self.assertFalse(child.done, child.describe())

    @inlineCallbacks
    def test_portForwardWebSocket(self):
        """kubectl 1.33 tunnels SPDY through a WebSocket."""
        yield self.checkPortForward(KUBECTL_1_33)
        self.assertEqual(
            self.lastUpgrade("portforward"), ("websocket", 101, "SPDY/3.1+portforward.k8s.io")
        )

    @inlineCallbacks
    def test_portForwardSpdy(self):
        yield self.checkPortForward(KUBECTL_1_33, SPDY_PORT_FORWARD)
        self.assertEqual(
            self.lastUpgrade("portforward"), ("spdy/3.1", 101, "portforward.k8s.io")
        )

    @inlineCallbacks
    def test_portForwardOldKubectl(self):
        self.needOldKubectl()
        yield self.checkPortForward(KUBECTL_1_29)
        self.assertEqual(self.lastUpgrade("portforward")[0], "spdy/3.1")

    @inlineCallbacks
    def test_portForwardClosedPort(self):
        """A port nothing listens on: kubectl prints the error and gives up."""
        child, port = yield self.portForward(KUBECTL_1_33, remote=9999)
        answer = yield httpGet(port)
        self.assertEqual(answer, b"")
        yield child.waitFor(lambda c: c.done, 10, "kubectl to give up")
        self.assertIn(b"error forwarding port 9999 to pod ticker", child.err)
        self.assertIn(b"lost connection to pod", child.err)

    @inlineCallbacks
    def checkCopy(self, binary):
        """``cp`` a file into the pod and back, through ``tar`` in the pod."""
        original = os.urandom(100_000)
        local = self.mktemp()
        with open(local, "wb") as f:
            f.write(original)
        copyIn = yield self.kubectl("cp", local, "ticker:/tmp/f", binary=binary)
        self.assertEqual(copyIn.code, 0, copyIn.describe())
        back = self.mktemp()
        copyOut = yield self.kubectl("cp", "ticker:/tmp/f", back, binary=binary)
        self.assertEqual(copyOut.code, 0, copyOut.describe())
        with open(back, "rb") as f:
            self.assertEqual(f.read(), original)

    def test_copy(self):
        return self.checkCopy(KUBECTL_1_33)

    def test_copyOldKubectl(self):
        self.needOldKubectl()
        return self.checkCopy(KUBECTL_1_29)

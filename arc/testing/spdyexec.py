"""``exec`` and ``attach`` over SPDY: the remote command protocol v4, sans-I/O.

Over SPDY each channel is a stream the client opens, named by its
``streamtype`` header: ``error``, ``stdin``, ``stdout``, ``stderr`` and
``resize``.  Like the kubelet, the handler waits until every stream the
request's ``stdin``, ``stdout``, ``stderr`` and ``tty`` parameters call for
is open, then runs the L{arc.testing.execsession.ExecSession}; its channel
messages go to the matching streams, the final ``Status`` (JSON, as in
``v4.channel.k8s.io``) to the error stream.  When the command has ended,
every stream is half-closed and the connection goes away.
"""

from arc.testing import execsession, spdy

V4 = "v4.channel.k8s.io"
PROTOCOLS = (V4,)

ERROR, STDIN, STDOUT, STDERR, RESIZE = "error", "stdin", "stdout", "stderr", "resize"

_STREAM_OF_CHANNEL = {
    execsession.STDOUT: STDOUT,
    execsession.STDERR: STDERR,
    execsession.STATUS: ERROR,
}


def chooseProtocol(offered):
    """The first of the client's ``X-Stream-Protocol-Version`` values served here."""
    return next((p for p in offered if p in PROTOCOLS), None)


def expectedStreams(stdin, stdout, stderr, tty):
    """The stream types a request with these parameters opens."""
    wanted = {ERROR}
    if stdin:
        wanted.add(STDIN)
    if stdout:
        wanted.add(STDOUT)
    if stderr and not tty:
        wanted.add(STDERR)
    if tty:
        wanted.add(RESIZE)
    return wanted


class RemoteCommandHandler:
    """The handler of a L{arc.testing.spdysession.SpdySession} running one command.

    @param session: the SPDY session.
    @param newSession: called with C{send} and C{close} callables, returns
        the L{arc.testing.execsession.ExecSession} to run.
    @param expected: the stream types to wait for (L{expectedStreams}).
    """

    def __init__(self, session, newSession, expected):
        self._spdy = session
        self._newSession = newSession
        self._expected = frozenset(expected)
        self._streams = {}
        self._early = []
        self.exec = None

    def streamOpened(self, stream):
        kind = stream.header("streamtype")
        known = kind in (ERROR, STDIN, STDOUT, STDERR, RESIZE)
        if not known or kind in self._streams or self.exec is not None:
            self._spdy.reset(stream, spdy.REFUSED_STREAM)
            return
        self._streams[kind] = stream
        if self._expected <= set(self._streams):
            self.exec = self._newSession(self._send, self._close)
            self.exec.start()
            for message in self._early:
                self.exec.messageReceived(message)
            self._early = []

    def streamDataReceived(self, stream, data):
        if stream is self._streams.get(STDIN):
            self._deliver(bytes([execsession.STDIN]) + data)

    def streamEnded(self, stream):
        if stream is self._streams.get(STDIN):
            self._deliver(bytes([execsession.CLOSE, execsession.STDIN]))

    def connectionLost(self):
        if self.exec is not None:
            self.exec.connectionLost()

    def _deliver(self, message):
        if self.exec is None:
            self._early.append(message)
        else:
            self.exec.messageReceived(message)

    def _send(self, message):
        stream = self._streams.get(_STREAM_OF_CHANNEL.get(message[0]))
        if stream is not None:
            self._spdy.send(stream, message[1:])

    def _close(self):
        for stream in self._streams.values():
            self._spdy.finish(stream)
        self._spdy.goAway()

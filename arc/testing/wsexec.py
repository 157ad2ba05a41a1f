"""The WebSocket side of the emulated ``pods/exec``: autobahn glue only.

The HTTP layer authenticates the upgrade request, checks the pod, picks the
channel protocol and then hands the request to L{execResource}; what the
command does is decided by L{arc.testing.execsession}.
"""

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.logger import Logger

from arc.testing.execsession import ExecSession


class ExecProtocol(WebSocketServerProtocol):
    """One exec connection: binary messages to and from an L{ExecSession}."""

    log = Logger()
    session = None

    def onConnect(self, request):
        return self.factory.subprotocol

    def onOpen(self):
        factory = self.factory
        self.session = ExecSession(
            factory.argv,
            factory.username,
            send=lambda message: self.sendMessage(message, isBinary=True),
            close=lambda: self.sendClose(1000),
            stdin=factory.stdin,
            tty=factory.tty,
        )
        factory.streams.add(self)
        self.log.info(
            "exec {argv} as {user} over {subprotocol}",
            argv=factory.argv,
            user=factory.username,
            subprotocol=factory.subprotocol,
        )
        self.session.start()

    def onMessage(self, payload, isBinary):
        self.session.messageReceived(payload)

    def onClose(self, wasClean, code, reason):
        if self.session is not None:
            self.factory.streams.discard(self)
            self.session.connectionLost()
            self.log.info(
                "exec {argv} ended, exit code {code}",
                argv=self.session.argv,
                code=self.session.exitCode,
            )

    def stopStreaming(self):
        """Drop the connection because the server is stopping."""
        self.dropConnection(abort=True)


def execResource(argv, username, subprotocol, streams, stdin=False, tty=False):
    """A one-shot resource that upgrades its request to an exec session.

    @param argv: the command line to emulate.
    @param username: the effective user, for ``whoami``.
    @param subprotocol: the channel protocol already chosen for the client.
    @param streams: a set the open connection adds itself to until it ends,
        so that a stopping server can close it.
    """
    factory = WebSocketServerFactory()
    factory.protocol = ExecProtocol
    factory.argv = argv
    factory.username = username
    factory.subprotocol = subprotocol
    factory.streams = streams
    factory.stdin = stdin
    factory.tty = tty
    return WebSocketResource(factory)

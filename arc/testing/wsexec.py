"""The WebSocket side of the emulated ``exec`` and ``attach``: autobahn glue only.

The HTTP layer authenticates the upgrade request, checks the pod, picks the
channel protocol and then hands the request to L{execResource}; what the
command does is decided by L{arc.testing.execsession}.
"""

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.logger import Logger


class ExecProtocol(WebSocketServerProtocol):
    """One connection: binary messages to and from an L{arc.testing.execsession.ExecSession}."""

    log = Logger()
    session = None

    def onConnect(self, request):
        return self.factory.subprotocol

    def onOpen(self):
        factory = self.factory
        self.session = factory.newSession(
            send=lambda message: self.sendMessage(message, isBinary=True),
            close=lambda: self.sendClose(1000),
        )
        factory.streams.add(self)
        self.log.info(
            "{argv} started over {subprotocol}",
            argv=self.session.argv,
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
                "{argv} ended, exit code {code}",
                argv=self.session.argv,
                code=self.session.exitCode,
            )

    def stopStreaming(self):
        """Drop the connection because the server is stopping."""
        self.dropConnection(abort=True)


def execResource(newSession, subprotocol, streams):
    """A one-shot resource that upgrades its request to an exec session.

    @param newSession: called with C{send} and C{close} callables, returns
        the L{arc.testing.execsession.ExecSession} to run.
    @param subprotocol: the channel protocol already chosen for the client.
    @param streams: a set the open connection adds itself to until it ends,
        so that a stopping server can close it.
    """
    factory = WebSocketServerFactory()
    factory.protocol = ExecProtocol
    factory.newSession = newSession
    factory.subprotocol = subprotocol
    factory.streams = streams
    return WebSocketResource(factory)

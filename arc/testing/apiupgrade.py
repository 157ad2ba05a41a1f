"""Upgrade requests of the emulator: ``exec``, ``attach`` and ``port-forward``.

What kubectl asks for, and what it gets here:

    - exec and attach over WebSocket (kubectl 1.30 and newer):
      ``Upgrade: websocket`` offering ``v5.channel.k8s.io`` (or ``v4``), see
      L{arc.testing.wsexec};
    - exec and attach over SPDY (the fallback, and all of kubectl 1.29):
      ``Upgrade: SPDY/3.1`` with repeated ``X-Stream-Protocol-Version``
      values, of which ``v4.channel.k8s.io`` is chosen, see
      L{arc.testing.spdyexec};
    - port-forward over WebSocket (kubectl 1.31 and newer): subprotocol
      ``SPDY/3.1+portforward.k8s.io``, SPDY inside the WebSocket;
    - port-forward over SPDY: ``X-Stream-Protocol-Version:
      portforward.k8s.io``, see L{arc.testing.portforward}.

Any other request is answered 400 with a ``Status`` naming what is
served; for a WebSocket attempt that makes kubectl fall back to SPDY.
An upgrade handed over is answered 101 (recorded as such in the request
log) with the chosen protocol in ``Sec-WebSocket-Protocol`` or
``X-Stream-Protocol-Version``.
"""

from arc.testing import execsession, spdyexec
from arc.testing.apistatus import badRequest
from arc.testing.spdyexec import RemoteCommandHandler
from arc.testing.spdyserver import spdyOverWebSocket, switchToSpdy
from arc.testing.wsexec import execResource

WEBSOCKET = "websocket"
SPDY = "spdy/3.1"
PORT_FORWARD = "portforward.k8s.io"
PORT_FORWARD_OVER_WEBSOCKET = "SPDY/3.1+portforward.k8s.io"

_WEBSOCKET_PROTOCOL = b"sec-websocket-protocol"
_STREAM_PROTOCOL = b"x-stream-protocol-version"


def upgradeKind(request):
    """The lower-cased ``Upgrade`` header of C{request}, or C{None}."""
    value = request.getHeader(b"upgrade")
    return value.decode("latin-1").strip().lower() if value else None


def negotiatedProtocol(request):
    """The protocol chosen for an upgraded C{request}, or C{None}."""
    for name in (_STREAM_PROTOCOL, _WEBSOCKET_PROTOCOL):
        value = request.responseHeaders.getRawHeaders(name)
        if value:
            return value[0].decode("latin-1")
    return None


def _offered(request, header):
    return [
        p.strip().decode("latin-1")
        for line in request.requestHeaders.getRawHeaders(header, [])
        for p in line.split(b",")
        if p.strip()
    ]


def _accept(request, header, protocol):
    request.setResponseCode(101)
    request.setHeader(header, protocol.encode("ascii"))
    if header == _STREAM_PROTOCOL:
        request.setHeader(b"connection", b"Upgrade")
        request.setHeader(b"upgrade", b"SPDY/3.1")


def _required(what, served):
    return badRequest(
        f"Upgrade request required: the API server emulator serves {what} over {served}"
    )


def remoteCommand(request, newSession, streams, stdin, stdout, stderr, tty):
    """Run an exec or attach session over the upgrade C{request} asks for.

    @param newSession: called with C{send} and C{close}, returns the
        L{arc.testing.execsession.ExecSession} to run.
    @param streams: the set of open streams of the server.
    @param stdin: the request's ``stdin`` parameter, and so on.
    @raise StatusError: 400 for no upgrade or no protocol in common.
    """
    kind = upgradeKind(request)
    if kind == WEBSOCKET:
        offered = _offered(request, _WEBSOCKET_PROTOCOL)
        subprotocol = execsession.chooseProtocol(offered)
        if subprotocol is None:
            raise badRequest(
                f"none of the offered exec protocols {offered} is supported; "
                f"offer {' or '.join(execsession.PROTOCOLS)}"
            )
        _accept(request, _WEBSOCKET_PROTOCOL, subprotocol)
        return execResource(newSession, subprotocol, streams).render(request)
    if kind == SPDY:
        offered = _offered(request, _STREAM_PROTOCOL)
        protocol = spdyexec.chooseProtocol(offered)
        if protocol is None:
            raise badRequest(
                f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                f"server supports {list(spdyexec.PROTOCOLS)}"
            )
        expected = spdyexec.expectedStreams(stdin, stdout, stderr, tty)
        _accept(request, _STREAM_PROTOCOL, protocol)
        return switchToSpdy(
            request, lambda session: RemoteCommandHandler(session, newSession, expected), streams
        )
    raise _required("exec and attach", "WebSocket (v5/v4.channel.k8s.io) and SPDY/3.1")


def portForward(request, makeHandler, streams):
    """Forward ports over the upgrade C{request} asks for.

    @param makeHandler: called with the SPDY session, returns its handler
        (an L{arc.testing.portforward.PortForwardHandler}).
    @raise StatusError: 400 for no upgrade or no protocol in common.
    """
    kind = upgradeKind(request)
    if kind == WEBSOCKET:
        offered = _offered(request, _WEBSOCKET_PROTOCOL)
        if PORT_FORWARD_OVER_WEBSOCKET not in offered:
            raise badRequest(
                f"none of the offered port-forward protocols {offered} is supported; "
                f"offer {PORT_FORWARD_OVER_WEBSOCKET}"
            )
        _accept(request, _WEBSOCKET_PROTOCOL, PORT_FORWARD_OVER_WEBSOCKET)
        return spdyOverWebSocket(PORT_FORWARD_OVER_WEBSOCKET, makeHandler, streams).render(request)
    if kind == SPDY:
        offered = _offered(request, _STREAM_PROTOCOL)
        if PORT_FORWARD not in offered:
            raise badRequest(
                f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                f"server supports {[PORT_FORWARD]}"
            )
        _accept(request, _STREAM_PROTOCOL, PORT_FORWARD)
        return switchToSpdy(request, makeHandler, streams)
    raise _required("port-forward", f"WebSocket ({PORT_FORWARD_OVER_WEBSOCKET}) and SPDY/3.1")

"""A small HTTPS backend standing in for kube-apiserver in the fault tests.

It answers HTTP/1.1 GET requests (keep-alive unless said otherwise):

``/version``
    a JSON version document (kubectl and the test chain probe it).
``/who``
    the backend's name, so a test can tell which agent served a request.
``/big?size=N[&abrupt=1]``
    ``N`` bytes of :func:`pattern` with ``Connection: close`` and no
    ``Content-Length`` (the body ends when the connection does), written at
    once, then the connection is closed: with a TLS close_notify, or with
    ``abrupt=1`` by closing the TCP connection under TLS without one.
``/slow?seconds=S&pieces=K``
    ``K`` KiB with a ``Content-Length``, one KiB every ``S/K`` seconds.
``/forever``
    a chunked body with one line every 0.2 s, until the client goes away.

Run as ``python -m tests.faultbackend --cert C --key K --port-file F --name N``;
it writes the bound port to ``F`` once listening.  :class:`BackendFactory`
serves the same in process.
"""

import argparse
import json
import os
import sys
from urllib.parse import parse_qs, urlsplit

from twisted.internet.protocol import Factory, Protocol

PATTERN = bytes(range(251))


def pattern(size):
    """The bytes ``/big`` sends: a 251-byte cycle (a prime, so shifts show)."""
    whole, rest = divmod(size, len(PATTERN))
    return PATTERN * whole + PATTERN[:rest]


class Backend(Protocol):
    def __init__(self, factory):
        self.factory = factory
        self.buf = b""
        self.timers = []

    def connectionMade(self):
        self.factory.connections += 1
        self.factory.total += 1

    def connectionLost(self, reason):
        self.factory.connections -= 1
        for timer in self.timers:
            if timer.active():
                timer.cancel()

    def dataReceived(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
            self.answer(target)

    def later(self, delay, f, *args):
        self.timers.append(self.factory.reactor.callLater(delay, f, *args))

    def answer(self, target):
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        write = self.transport.write
        if url.path == "/version":
            body = json.dumps({"major": "1", "minor": "33", "gitVersion": "v1.33.0"}).encode()
            write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        elif url.path == "/who":
            body = self.factory.name.encode()
            write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        elif url.path == "/big":
            write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                  b"Connection: close\r\n\r\n")
            write(pattern(int(query.get("size", 20 * 1024 * 1024))))
            if query.get("abrupt"):
                # Close TCP under the TLS layer: the data already written is
                # sent, but no close_notify ends the TLS session.
                tcp = getattr(self.transport, "transport", self.transport)
                self.factory.reactor.callLater(0, tcp.loseConnection)
            else:
                self.transport.loseConnection()
        elif url.path == "/slow":
            pieces = int(query.get("pieces", 10))
            step = float(query.get("seconds", 2)) / pieces
            write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: %d\r\n\r\n" % (pieces * 1024))
            for i in range(pieces):
                self.later(step * (i + 1), write, b"s" * 1024)
        elif url.path == "/forever":
            write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
            self.tick(0)
        else:
            write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def tick(self, n):
        line = b"line %d\n" % n
        self.transport.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.later(0.2, self.tick, n + 1)


class BackendFactory(Factory):
    def __init__(self, reactor, name="backend"):
        self.reactor = reactor
        self.name = name
        self.connections = 0
        self.total = 0

    def buildProtocol(self, addr):
        return Backend(self)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--name", default="backend")
    args = parser.parse_args(argv)
    from twisted.internet import reactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from arc.tls import server_options
    with open(args.cert, "rb") as f:
        cert = f.read()
    with open(args.key, "rb") as f:
        key = f.read()
    factory = TLSMemoryBIOFactory(server_options(cert, key), False,
                                  BackendFactory(reactor, args.name))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(port.getHost().port))
    os.rename(args.port_file + ".tmp", args.port_file)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())

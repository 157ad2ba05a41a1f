"""A small HTTP CONNECT proxy for tests of egress through corporate proxies.

It accepts ``CONNECT host:port`` only for loopback targets, optionally
requires ``Proxy-Authorization``, and appends one JSON line per CONNECT to
``DIR/connects.jsonl``.

    python -m arc.testing.connectproxy --state-dir DIR [--listen tcp:0:interface=127.0.0.1]
        [--user NAME:PASSWORD]

writes ``DIR/port`` once listening and runs until SIGTERM.
"""

import base64
import ipaddress
import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage


class _Target(Protocol):
    def __init__(self, client):
        self.client = client

    def connectionMade(self):
        self.client.target_connected(self.transport)

    def dataReceived(self, data):
        self.client.transport.write(data)

    def connectionLost(self, reason):
        self.client.transport.loseConnection()


class ConnectProtocol(Protocol):
    def __init__(self, proxy):
        self.proxy = proxy
        self.buf = b""
        self.target = None

    def dataReceived(self, data):
        if self.target is not None:
            self.target.write(data)
            return
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 16384:
                self.transport.loseConnection()
            return
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        authority = rest.split(" ")[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        host, _, port = authority.rpartition(":")
        host = host.strip("[]")
        record = {"method": method, "target": authority,
                  "auth": "proxy-authorization" in headers}
        self.proxy.record(record)
        if method != "CONNECT" or not port.isdigit():
            return self._answer(405, "only CONNECT")
        if self.proxy.credentials and headers.get("proxy-authorization") != (
                "Basic " + self.proxy.credentials):
            return self._answer(407, "Proxy Authentication Required",
                                "Proxy-Authenticate: Basic realm=\"test\"\r\n")
        try:
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                return self._answer(403, "only loopback targets")
        except ValueError:
            return self._answer(403, "only loopback targets")
        self.transport.pauseProducing()
        d = HostnameEndpoint(reactor, host, int(port)).connect(
            Factory.forProtocol(lambda: _Target(self)))
        d.addErrback(lambda f: self._answer(502, "Bad Gateway"))

    def target_connected(self, transport):
        self.target = transport
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.buf:
            transport.write(self.buf)
            self.buf = b""
        self.transport.resumeProducing()

    def _answer(self, code, text, extra=""):
        self.transport.write(("HTTP/1.1 %d %s\r\n%sContent-Length: 0\r\n\r\n"
                              % (code, text, extra)).encode())
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.target is not None:
            self.target.loseConnection()


class ConnectProxy(Factory):
    def __init__(self, log_path, credentials=None):
        self.log_path = log_path
        self.credentials = credentials

    def record(self, entry):
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def buildProtocol(self, addr):
        return ConnectProtocol(self)


class Options(usage.Options):
    optParameters = [["state-dir", None, None, "directory for port and connects.jsonl"],
                     ["listen", None, "tcp:0:interface=127.0.0.1", "endpoint"],
                     ["user", None, None, "NAME:PASSWORD required from clients"]]


def main(argv):
    options = Options()
    options.parseOptions(argv)
    state = options["state-dir"]
    os.makedirs(state, exist_ok=True)
    credentials = base64.b64encode(options["user"].encode()).decode() if options["user"] else None
    factory = ConnectProxy(os.path.join(state, "connects.jsonl"), credentials)

    def listening(port):
        with open(os.path.join(state, "port"), "w") as f:
            f.write(str(port.getHost().port))
        print("connect proxy listening on %d" % port.getHost().port, flush=True)

    serverFromString(reactor, options["listen"]).listen(factory).addCallback(listening)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])

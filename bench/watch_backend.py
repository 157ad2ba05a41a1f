"""The watch workload's API server stand-in: holds watches, then sends each one event.

A Twisted TLS server on 127.0.0.1 that answers

    GET /api/v1/namespaces/default/pods?watch=true   200, chunked, held open (a watch)
    GET /api/v1/namespaces/default/pods              200, a small PodList (for readiness checks)
    anything else                                    404

It checks no token.  A plain-text control port (127.0.0.1 only) takes one command a line:

    count   ->  "held N"                   watches open right now
    fire    ->  "fired N MS"               send every held watch one event, N events in MS ms
    close   ->  "closed N"                 abort every held watch

Each event is one chunk holding one JSON watch event (about 1 KiB, the size of a small
Pod) whose ``sent_ns`` field is ``time.monotonic_ns()`` taken just before that event is
written; the watcher on the same machine subtracts it from its own clock on receipt.
Events go out in batches of BATCH watches per reactor turn, so that a stamp is taken
shortly before its bytes reach the socket.

    python bench/watch_backend.py --port P --control-port C --cert CRT --key KEY
"""

import argparse
import json
import resource
import sys
import time

from twisted.internet import reactor, ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver
from twisted.python import log

WATCH_PATH = "/api/v1/namespaces/default/pods?watch=true"
LIST_PATH = "/api/v1/namespaces/default/pods"
CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Cache-Control: no-cache, private\r\nTransfer-Encoding: chunked\r\n\r\n")
LIST_BODY = json.dumps({"kind": "PodList", "apiVersion": "v1",
                        "metadata": {"resourceVersion": "1"}, "items": []}).encode() + b"\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
BATCH = 100
MAX_HEAD = 16384


def event_template():
    """The event's JSON with a placeholder for the stamp, padded to about 1 KiB."""
    doc = {"type": "MODIFIED", "object": {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": "web-0", "namespace": "default", "resourceVersion": "2",
                     "uid": "00000000-0000-4000-8000-000000000000", "labels": {"app": "web"},
                     "annotations": {"pad": ""}},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.25"}], "nodeName": "node-1"},
        "status": {"phase": "Running", "podIP": "10.0.0.10"}},
        "sent_ns": 0}
    text = json.dumps(doc, separators=(",", ":"))
    doc["object"]["metadata"]["annotations"]["pad"] = "x" * max(0, 1000 - len(text))
    text = json.dumps(doc, separators=(",", ":"))
    before, after = text.split('"sent_ns":0')
    return (before + '"sent_ns":').encode(), after.encode() + b"\n"


EVENT_BEFORE, EVENT_AFTER = event_template()


class Watch(Protocol):
    def __init__(self, server):
        self.server = server
        self.buf = b""
        self.watching = False

    def dataReceived(self, data):
        if self.watching:
            return  # a watch's request body: there is none; ignore anything else
        self.buf += data
        while not self.watching:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.transport.loseConnection()
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            parts = head.split(b"\r\n", 1)[0].split()
            target = parts[1].decode("latin-1") if len(parts) == 3 else ""
            if parts[:1] != [b"GET"]:
                self.transport.write(NOT_FOUND)
            elif target == WATCH_PATH:
                self.watching = True
                self.transport.write(CHUNKED_HEAD)
                self.server.held.add(self)
                self.server.opened += 1
            elif target == LIST_PATH:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(LIST_BODY), LIST_BODY))
            else:
                self.transport.write(NOT_FOUND)

    def send_event(self):
        body = b"%s%d%s" % (EVENT_BEFORE, time.monotonic_ns(), EVENT_AFTER)
        self.transport.write(b"%x\r\n%s\r\n" % (len(body), body))

    def connectionLost(self, reason):
        self.server.held.discard(self)


class Server:
    def __init__(self):
        self.held = set()
        self.opened = 0
        self.firing = False


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, server):
        self.server = server

    def lineReceived(self, line):
        cmd = line.strip().decode("ascii", "replace")
        if cmd == "count":
            self.sendLine(b"held %d" % len(self.server.held))
        elif cmd == "fire":
            self.fire()
        elif cmd == "close":
            watches = list(self.server.held)
            for w in watches:
                w.transport.abortConnection()
            self.sendLine(b"closed %d" % len(watches))
        else:
            self.sendLine(b"error unknown command")

    def fire(self):
        if self.server.firing:
            self.sendLine(b"error already firing")
            return
        self.server.firing = True
        todo = list(self.server.held)
        started = time.monotonic()
        sent = [0]

        def batch():
            for w in todo[sent[0]:sent[0] + BATCH]:
                if w in self.server.held:
                    w.send_event()
            sent[0] += BATCH
            if sent[0] < len(todo):
                reactor.callLater(0, batch)
            else:
                self.server.firing = False
                self.sendLine(b"fired %d %.1f" % (len(todo), (time.monotonic() - started) * 1e3))

        batch()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--cert", required=True, help="PEM certificate")
    p.add_argument("--key", required=True, help="PEM private key")
    p.add_argument("--backlog", type=int, default=1024)
    args = p.parse_args(argv)
    with open(args.cert, "rb") as f:
        cert = f.read()
    with open(args.key, "rb") as f:
        key = f.read()
    pem = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
    # HTTP/1.1 only, chosen by ALPN when the client offers it (as kube-apiserver would
    # choose it for a client that offers http/1.1 only).
    options = ssl.CertificateOptions(privateKey=pem.privateKey.original,
                                     certificate=pem.original,
                                     acceptableProtocols=[b"http/1.1"])
    server = Server()
    log.startLogging(sys.stdout, setStdout=False)
    reactor.listenSSL(args.port, Factory.forProtocol(lambda: Watch(server)), options,
                      backlog=args.backlog, interface="127.0.0.1")
    reactor.listenTCP(args.control_port, Factory.forProtocol(lambda: Control(server)),
                      interface="127.0.0.1")
    print("watch backend on 127.0.0.1:%d, control 127.0.0.1:%d, descriptor limit %d"
          % (args.port, args.control_port, resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
          flush=True)
    reactor.run()


if __name__ == "__main__":
    main()

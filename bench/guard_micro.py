"""The guard's CPU cost per request, in process: no sockets, no TLS, no tunnel.

    .venv/bin/python bench/guard_micro.py                  # every mode, 7 rounds of 2000 requests
    .venv/bin/python bench/guard_micro.py -n 5000 -r 9     # more requests, more rounds
    .venv/bin/python bench/guard_micro.py --modes static,oidc
    .venv/bin/python bench/guard_micro.py --audit /dev/null
    .venv/bin/python bench/guard_micro.py --profile static # cProfile (CPU time) of one mode

It imports arc from the checkout it sits in.  Nothing else needs to run:
it takes about a minute.

One :class:`~arc.guard.proxy.GuardProtocol` serves N keep-alive requests of
the shape kubectl sends for ``kubectl get pods`` (``GET
/api/v1/namespaces/default/pods?limit=500`` with kubectl's headers and a
bearer token: a 1 KiB service-account token in passthrough mode), and the
fake API server answers each with kube-apiserver's response headers and a
1 KiB JSON ``PodList`` (Content-Length, or chunked in the ``chunked``
mode), head and body in one read.  The guard is the one the agent builds
(:class:`~arc.guard.guard.Guard` with its authenticator, an
:class:`~arc.guard.audit.AuditLog` writing to a file, and
:class:`~arc.ops.guardmetrics.GuardMetrics` in a registry of its own); only
its transports and its upstream connector are fakes that do nothing.  The
reactor is the real one, never started: after every request the benchmark
runs its due calls (``runUntilCurrent``), which writes the audit record, as
the reactor's next turn would.  The OIDC issuer keeps time on a
:class:`~twisted.internet.task.Clock` that stands still, so that its token
stays in the authenticator's cache.

Modes:

``splice``       no guard: a protocol that only hands bytes on (the harness's own cost)
``passthrough``  the caller's token goes on unchanged (the agent's default)
``static``       a static token (SHA-256 lookup), impersonated with the guard's credential
``oidc``         an OIDC ID token already verified once (the authenticator's cache)
``chunked``      passthrough, the response chunked (two data chunks and the last one)

Printed per mode: the median over the rounds of CPU time
(``time.process_time``) per request in µs, with the smallest and largest
round; and, counted over ten requests, the writes to the client and to
the API server and the pauses of the client's transport per request
(each costs frames on the tunnel, outside this process).  Compare figures
from one run on one machine only.
"""

import argparse
import base64
import cProfile
import gc
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prometheus_client import CollectorRegistry  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from arc.guard.audit import AuditLog  # noqa: E402
from arc.guard.guard import Guard, GuardConfig  # noqa: E402
from arc.identity.authenticator import Authenticator  # noqa: E402
from arc.identity.oidc import OIDCIssuer  # noqa: E402
from arc.identity.settings import IssuerSettings  # noqa: E402
from arc.identity.static import StaticTokens  # noqa: E402
from arc.ops.guardmetrics import GuardMetrics  # noqa: E402
from arc.relay.registry import token_digest  # noqa: E402
from arc.testing.oidc import KeyRing  # noqa: E402

MODES = ("splice", "passthrough", "static", "oidc", "chunked")
ISSUER = "https://idp.example.com/realms/ops"
CLIENT_ID = "arc"


def _b64(obj):
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(
        b"=").decode()


# A bound service-account token as the kubelet mounts it (RS256): the shape and
# the length (about 1 KiB) of what passthrough mode forwards.
SA_TOKEN = ".".join((
    _b64({"alg": "RS256", "kid": "Xq3bOq6bRzM0mJ7yU9tLkP2vWcE8aFgH1iJ5nDsT4o"}),
    _b64({"aud": ["https://kubernetes.default.svc.cluster.local"], "exp": 1767225600,
          "iat": 1735689600, "iss": "https://kubernetes.default.svc.cluster.local",
          "jti": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b",
          "kubernetes.io": {"namespace": "dev",
                            "node": {"name": "worker-1",
                                     "uid": "5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d"},
                            "pod": {"name": "deploy-bot-7d9f8c6b5-x2k4q",
                                    "uid": "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"},
                            "serviceaccount": {"name": "deploy-bot",
                                               "uid": "1a2b3c4d-5e6f-4a0b-9c8d-7e6f5a4b3c2d"},
                            "warnafter": 1735693207},
          "nbf": 1735689600, "sub": "system:serviceaccount:dev:deploy-bot"}),
    base64.urlsafe_b64encode(bytes(range(256)) * 1).rstrip(b"=").decode()[:342],
))
STATIC_TOKEN = "ci-7f3a9c2e41d84b0f9a6e5d3c2b1a0f9e5d4c3b2a1f0e9d8c"
GUARD_SA_TOKEN = "guard-service-account-token-0123456789abcdef"

# A PodList of one pod, padded to 1 KiB, as kube-apiserver answers a small list.
_POD = (b'{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"123456"},'
        b'"items":[{"metadata":{"name":"ticker","namespace":"default","uid":'
        b'"6f1c2d3e-4a5b-4c6d-8e7f-901234567890","resourceVersion":"123400",'
        b'"creationTimestamp":"2024-05-01T12:00:00Z","labels":{"app":"ticker"}},'
        b'"spec":{"containers":[{"name":"ticker","image":"busybox:1.36","command":'
        b'["sh","-c","while true; do date; sleep 1; done"]}]},"status":{"phase":"Running",'
        b'"podIP":"10.244.0.12","startTime":"2024-05-01T12:00:01Z"}}],"pad":"')
BODY = _POD + b"x" * (1024 - len(_POD) - 3) + b'"}\n'
assert len(BODY) == 1024


def kubectl_request(token):
    """``kubectl get pods`` as kubectl 1.33 sends it (Go writes the header names sorted)."""
    return ("GET /api/v1/namespaces/default/pods?limit=500 HTTP/1.1\r\n"
            "Host: demo.arc.localhost:47011\r\n"
            "User-Agent: kubectl/v1.33.1 (linux/amd64) kubernetes/8adc0f0\r\n"
            "Accept: application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;"
            "v=v1beta1;g=meta.k8s.io,application/json\r\n"
            "Authorization: Bearer %s\r\n"
            "Kubectl-Command: kubectl get\r\n"
            "Kubectl-Session: 5f0c6a9e-3b1d-4e2f-9a8b-7c6d5e4f3a2b\r\n"
            "Accept-Encoding: gzip\r\n"
            "\r\n" % (token,)).encode("latin-1")


_RESPONSE_HEAD = ("HTTP/1.1 200 OK\r\n"
                  "Audit-Id: 3c1e8f0a-2b4d-4c6e-8f1a-3b5c7d9e1f20\r\n"
                  "Cache-Control: no-cache, private\r\n"
                  "Content-Type: application/json\r\n"
                  "X-Kubernetes-Pf-Flowschema-Uid: 1f2e3d4c-5b6a-4789-9a0b-c1d2e3f40516\r\n"
                  "X-Kubernetes-Pf-Prioritylevel-Uid: 2a3b4c5d-6e7f-4809-8a1b-2c3d4e5f6071\r\n"
                  "Date: Wed, 01 May 2024 12:00:00 GMT\r\n")
RESPONSE = (_RESPONSE_HEAD + "Content-Length: %d\r\n\r\n" % len(BODY)).encode() + BODY
_HALF = len(BODY) // 2
CHUNKED_RESPONSE = ((_RESPONSE_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode()
                    + b"%x\r\n" % _HALF + BODY[:_HALF] + b"\r\n"
                    + b"%x\r\n" % (len(BODY) - _HALF) + BODY[_HALF:] + b"\r\n0\r\n\r\n")


class NullTransport:
    """A transport that accepts everything, keeps nothing and counts calls.

    In the agent the downstream transport is a tunnel stream: each write is
    a DATA frame through relay and client, and each resumeProducing may
    send a WINDOW_UPDATE frame, so these counts are costs of the whole path.
    """

    disconnecting = False

    def __init__(self):
        self.written = 0
        self.writes = 0
        self.pauses = 0
        self.producer = None

    def write(self, data):
        self.written += len(data)
        self.writes += 1

    def writeSequence(self, seq):
        for data in seq:
            self.written += len(data)
        self.writes += 1

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def pauseProducing(self):
        self.pauses += 1

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass

    def loseConnection(self):
        self.disconnecting = True

    def loseWriteConnection(self):
        pass

    def abortConnection(self):
        self.disconnecting = True

    def getPeer(self):
        return None

    def getHost(self):
        return None


class FakeAPIServer:
    """The guard's upstream connector: connects at once to a :class:`NullTransport`."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.side = None

    def describe(self):
        return "https://api.bench:6443"

    def credential_headers(self):
        return [["Authorization", "Bearer " + GUARD_SA_TOKEN]]

    def connect(self, mode, factory):
        self.side = factory.buildProtocol(None)
        self.side.makeConnection(NullTransport())
        return succeed(self.side)


class NoFetch:
    """The issuer's document fetcher: the keys are installed by hand."""

    def get_json(self, url):
        raise AssertionError("no fetch expected: %s" % (url,))

    def close(self):
        return succeed(None)


def oidc_authenticator(clock):
    """An authenticator for one issuer, with its keys, and a token it has verified once."""
    ring = KeyRing()
    ring.add("RS256")
    settings = IssuerSettings(issuer=ISSUER, client_id=CLIENT_ID)
    issuer = OIDCIssuer(settings, clock=clock, fetcher=NoFetch())
    from arc.identity.jwks import KeySet
    issuer._install(KeySet.parse({"keys": [ring.key().jwk()]}, settings.algorithms))
    now = clock.seconds()
    token = ring.mint(ISSUER, now, {"sub": "bench", "aud": CLIENT_ID, "groups": ["bench"],
                                    "email": "bench@example.com", "email_verified": True},
                      ttl=36000)
    return Authenticator(None, [issuer], False), token


def build(mode, audit_path):
    """``(protocol, upstream, reactor, request, response, audit)`` for ``mode``."""
    from twisted.internet import reactor
    clock = Clock()
    clock.advance(time.time())
    if mode in ("passthrough", "chunked", "splice"):
        authenticator, token = Authenticator(None, (), True), SA_TOKEN
    elif mode == "static":
        static = StaticTokens({"bench": (token_digest(STATIC_TOKEN), ("bench",))})
        authenticator, token = Authenticator(static, (), False), STATIC_TOKEN
    elif mode == "oidc":
        authenticator, token = oidc_authenticator(clock)
    else:
        raise ValueError(mode)
    audit = AuditLog(audit_path, reactor=reactor)
    cfg = GuardConfig(enabled=True, authenticator=authenticator, allow_impersonation=False,
                      audit=audit, token_refresh=60.0)
    upstream = FakeAPIServer(reactor)
    guard = Guard(cfg, "demo", upstream)
    guard.metrics = GuardMetrics(CollectorRegistry())
    response = CHUNKED_RESPONSE if mode == "chunked" else RESPONSE
    if mode == "splice":
        return Splice(upstream), upstream, reactor, kubectl_request(token), response, audit
    protocol = guard.protocol(peer="stream 7")
    protocol.makeConnection(NullTransport())
    return protocol, upstream, reactor, kubectl_request(token), response, audit


class Splice(Protocol):
    """Bytes both ways and nothing else: what the harness costs without the guard."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.makeConnection(NullTransport())
        upstream.connect("passthrough", self)

    def buildProtocol(self, addr):
        return _SpliceUp(self)

    def dataReceived(self, data):
        self.upstream.side.transport.write(data)


class _SpliceUp(Protocol):
    def __init__(self, down):
        self.down = down

    def dataReceived(self, data):
        self.down.transport.write(data)


def run(protocol, upstream, reactor, request, response, n):
    """Send ``n`` requests and their responses; CPU seconds spent."""
    received = protocol.dataReceived
    turn = reactor.runUntilCurrent
    start = time.process_time()
    for _ in range(n):
        received(request)
        upstream.side.dataReceived(response)
        turn()
    return time.process_time() - start


def measure(mode, n, rounds, audit_path):
    """CPU µs per request of each round."""
    protocol, upstream, reactor, request, response, audit = build(mode, audit_path)
    run(protocol, upstream, reactor, request, response, min(n, 200))     # warm up
    samples = []
    for _ in range(rounds):
        gc.collect()
        samples.append(run(protocol, upstream, reactor, request, response, n) / n * 1e6)
    audit.close()
    return samples


def check(mode, directory):
    """Ten requests, looked at: answered, audited as allowed; the calls they cost."""
    audit_path = os.path.join(directory, "check-%s.jsonl" % (mode,))
    protocol, upstream, reactor, request, response, audit = build(mode, audit_path)
    run(protocol, upstream, reactor, request, response, 10)
    audit.close()
    down, up = protocol.transport, upstream.side.transport
    if mode != "splice":
        with open(audit_path, "rb") as f:
            lines = f.read().splitlines()
        if down.disconnecting or len(lines) != 10 or b'"decision":"allow"' not in lines[-1]:
            raise SystemExit("mode %s: the guard did not serve the requests (closed=%s, "
                             "audit=%r)" % (mode, down.disconnecting, lines[-1:]))
    if down.written != 10 * len(response):
        raise SystemExit("mode %s: %d response bytes sent downstream, expected %d"
                         % (mode, down.written, 10 * len(response)))
    return down.writes / 10, up.writes / 10, down.pauses / 10


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=2000,
                        help="requests per round (default 2000)")
    parser.add_argument("-r", "--rounds", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of %s" % (", ".join(MODES),))
    parser.add_argument("--audit", default=None,
                        help="audit file (default: a temporary file, removed at the end)")
    parser.add_argument("--profile", metavar="MODE", default=None,
                        help="profile MODE with cProfile (CPU time) instead of timing")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes + ([args.profile] if args.profile else []):
        if mode not in MODES:
            parser.error("unknown mode %r (choose from %s)" % (mode, ", ".join(MODES)))
    tmp = tempfile.TemporaryDirectory(prefix="guard-micro-")
    audit_path = args.audit or os.path.join(tmp.name, "audit.jsonl")
    try:
        if args.profile:
            built = build(args.profile, audit_path)
            run(*built[:5], 200)
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            run(*built[:5], args.requests)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
            return 0
        calls = {mode: check(mode, tmp.name) for mode in modes}
        print("guard microbenchmark: %d requests x %d rounds, Python %s, audit to %s"
              % (args.requests, args.rounds, sys.version.split()[0],
                 args.audit or "a temporary file"))
        print("CPU per request (time.process_time), and per request: writes to the client,")
        print("writes to the API server, pauses of the client's transport")
        print("%-12s %10s %10s %10s %7s %7s %7s" % ("mode", "median", "min", "max", "down",
                                                   "up", "pauses"))
        for mode in modes:
            samples = measure(mode, args.requests, args.rounds, audit_path)
            print("%-12s %7.1f µs %7.1f µs %7.1f µs %7.1f %7.1f %7.1f"
                  % ((mode, statistics.median(samples), min(samples), max(samples))
                     + calls[mode]))
            sys.stdout.flush()
    finally:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

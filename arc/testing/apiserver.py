"""A Kubernetes API server emulator that real kubectl accepts, for tests and demos.

It serves, over HTTPS and HTTP/1.1: discovery, namespaces, pods and config
maps (get, list with ``Table`` output, watch, create, apply, patch, delete),
pod logs (``logs -f`` of the pre-created ``ticker`` pod prints a line every
0.2 s), ``auth whoami`` and ``auth can-i``, and, over WebSocket and over
SPDY/3.1 (L{arc.testing.apiupgrade}), ``exec`` of emulated commands
(``echo``, ``cat``, ``true``, ``false``, ``sh -c "exit N"``, ``whoami``,
``test``, and the ``tar`` that ``kubectl cp`` runs on each pod's in-memory
files), ``attach`` (every pod's main process echoes the lines of its stdin)
and ``port-forward`` (every pod answers HTTP on port 8080 with ``hello from
POD:8080``).

Callers authenticate with bearer tokens; ``Impersonate-*`` headers are
honoured for configured impersonators only.  Impersonators and members of
``system:masters`` may also ask, with a ``SubjectAccessReview``, whether
some user may impersonate another user or a group; the answers follow the
``--allow-impersonate`` rules.

Command line::

    python -m arc.testing.apiserver --state-dir DIR
        [--listen tcp:PORT:interface=127.0.0.1]      (default: tcp:0:...)
        [--token TOKEN=USER[:GROUP,GROUP...]]...     (default:
                                          admin-token=admin:system:masters)
        [--impersonator USER]...
        [--deny-user USER]...
        [--allow-impersonate USER=TARGET]...           (USER or TARGET may be *)
        [--request-log FILE]

On first start DIR receives a self-signed CA (``ca.crt``, ``ca.key``) and a
serving certificate for 127.0.0.1, ::1 and localhost (``server.crt``,
``server.key``).  Once listening, the emulator writes ``DIR/port`` (the bound
port) and ``DIR/kubeconfig`` (context ``emulator``, first token's user), prints
``apiserver listening on https://127.0.0.1:PORT`` and runs until SIGTERM or
SIGINT, then exits 0.  With ``--request-log``, every request is appended to
FILE as one JSON line (see L{arc.testing.apihttp.RequestLog}).

Every token's user is in ``system:authenticated`` besides its own groups.
``--impersonator`` users may send ``Impersonate-User``, ``-Group`` (repeated),
``-Uid`` and ``-Extra-<key>``; anyone else gets 403.  ``--deny-user`` users
get 403 on everything but discovery and questions about themselves, as an
account without RBAC bindings would.

From a test in another process: start the command line with ``--listen
tcp:0:interface=127.0.0.1``, wait for the ``apiserver listening on`` line
(``DIR/port`` is written last), then run kubectl with ``--kubeconfig
DIR/kubeconfig --cache-dir TMP`` (kubectl caches discovery per host and port).

In-process, in the test's own reactor::

    server = APIServer(stateDir, tokens={"t": UserInfo("alice", ("devs",))})
    port = yield server.startService()    # fires with the bound port
    # server.kubeconfig, server.url, server.requests, server.store
    yield server.stopService()

Not served: protobuf request bodies (``kubectl create configmap NAME``
sends one; use a manifest with ``kubectl apply -f`` or ``create -f``) and
OpenAPI v2 (kubectl 1.28 and older validate manifests against it: give them
``--validate=false``; 1.29 and newer use the OpenAPI v3 stub served here,
which describes the core kinds only).
"""

import sys

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from arc.errors import ConfigError
from arc.testing.apiauth import Authenticator, parseImpersonationRule, parseTokenSpec
from arc.testing.apicerts import ensureCredentials, writeKubeconfig
from arc.testing.apihttp import APIResource, RequestLog
from arc.testing.apiresources import NAMESPACES, PODS
from arc.testing.apistore import ObjectStore
from arc.testing.podlogs import TICK_ANNOTATION

DEFAULT_TOKEN = "admin-token=admin:system:masters"
DEFAULT_LISTEN = "tcp:0:interface=127.0.0.1"
PORT_FILE = "port"


def seedCluster(store):
    """Create what a fresh cluster has: namespaces, and the ``ticker`` pod."""
    for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
        store.create(NAMESPACES, "", {"metadata": {"name": name}})
    ticker = {
        "metadata": {
            "name": "ticker",
            "labels": {"app": "ticker"},
            "annotations": {TICK_ANNOTATION: "0.2"},
        },
        "spec": {"containers": [{"name": "ticker", "image": "busybox:1.36"}]},
    }
    store.create(PODS, "default", ticker)


class _QuietSite(Site):
    """A site without an access log: L{APIResource} logs each request with its user."""

    noisy = False

    def log(self, request):
        pass


class _NoDelayHTTPChannel(HTTPChannel):
    """HTTP/1.1 with Nagle's algorithm off: watch events and ticks go out at once."""

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


class APIServer(Service):
    """The emulator as a service listening with TLS on a stream endpoint.

    @param stateDir: directory (path or L{FilePath}) for the credentials,
        ``port`` and ``kubeconfig``.
    @param listen: a plain stream server endpoint string; TLS is added.
    @param tokens: ordered mapping of bearer token to
        L{arc.testing.apiauth.UserInfo}; the first goes in the kubeconfig.
    @param impersonators: user names allowed to impersonate.
    @param deniedUsers: user names refused all but discovery and whoami.
    @param impersonationRules: L{arc.testing.apiauth.ImpersonationRule}s
        that ``SubjectAccessReview`` answers follow.
    @param requestLog: a file to append one JSON line per request to.
    """

    log = Logger()

    def __init__(
        self,
        stateDir,
        listen=DEFAULT_LISTEN,
        tokens=None,
        impersonators=(),
        deniedUsers=(),
        impersonationRules=(),
        requestLog=None,
        reactor=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        if tokens is None:
            tokens = dict([parseTokenSpec(DEFAULT_TOKEN)])
        if not tokens:
            raise ConfigError("at least one token is needed", key="--token")
        self._reactor = reactor
        self._stateDir = stateDir if isinstance(stateDir, FilePath) else FilePath(stateDir)
        self._listen = listen
        self._kubeconfigToken = next(iter(tokens))
        self._requestLog = RequestLog(requestLog)
        self.store = ObjectStore(clock=reactor.seconds)
        seedCluster(self.store)
        authenticator = Authenticator(tokens, impersonators, deniedUsers, impersonationRules)
        self._resource = APIResource(self.store, authenticator, self._requestLog, reactor)
        self._port = None
        self.port = None

    @property
    def url(self):
        """``https://127.0.0.1:PORT`` once listening."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self):
        """The kubeconfig file written once listening."""
        return self._stateDir.child("kubeconfig")

    @property
    def requests(self):
        """Records of the requests answered so far (see L{RequestLog})."""
        return self._requestLog.records

    def startService(self):
        """Listen, then write ``port`` and ``kubeconfig``.

        @return: a L{Deferred} firing with the bound port number.
        """
        super().startService()
        credentials = ensureCredentials(self._stateDir)
        self._requestLog.open()
        site = _QuietSite(self._resource)
        site.protocol = _NoDelayHTTPChannel
        factory = TLSMemoryBIOFactory(credentials.serverOptions(), False, site)
        endpoint = serverFromString(self._reactor, self._listen)

        def listening(port):
            self._port = port
            self.port = port.getHost().port
            writeKubeconfig(self._stateDir, credentials.caCert, self.url, self._kubeconfigToken)
            self._stateDir.child(PORT_FILE).setContent(b"%d\n" % (self.port,))
            self.log.info("apiserver listening on {url}", url=self.url)
            return self.port

        return endpoint.listen(factory).addCallback(listening)

    def stopService(self):
        """Stop listening; end open watches, followed logs and upgraded connections."""
        super().stopService()
        for stream in list(self._resource.streams):
            stream.stopStreaming()
        self._requestLog.close()
        if self._port is None:
            return None
        port, self._port = self._port, None
        return port.stopListening()


class Options(usage.Options):
    """Command line of ``python -m arc.testing.apiserver``."""

    synopsis = "python -m arc.testing.apiserver --state-dir DIR [options]"
    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "plain stream endpoint to serve HTTPS on"],
        ["state-dir", None, None, "directory for credentials, port and kubeconfig"],
        ["request-log", None, None, "append one JSON line per request to this file"],
    ]

    def __init__(self):
        super().__init__()
        self["tokens"] = {}
        self["impersonators"] = []
        self["deny-users"] = []
        self["allow-impersonate"] = []

    def opt_token(self, spec):
        """TOKEN=USER[:GROUP,GROUP...] (repeatable; the first is in the kubeconfig)"""
        try:
            token, user = parseTokenSpec(spec)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["tokens"][token] = user

    def opt_impersonator(self, user):
        """a user allowed to send Impersonate-* headers (repeatable)"""
        self["impersonators"].append(user)

    def opt_deny_user(self, user):
        """a user refused everything but discovery and whoami (repeatable)"""
        self["deny-users"].append(user)

    def opt_allow_impersonate(self, spec):
        """USER=TARGET: access reviews allow USER to impersonate TARGET (repeatable; * for any)"""
        try:
            self["allow-impersonate"].append(parseImpersonationRule(spec))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self):
        if not self["state-dir"]:
            raise usage.UsageError("--state-dir is required")
        if not self["tokens"]:
            self.opt_token(DEFAULT_TOKEN)


def makeService(config, reactor=None):
    """The L{APIServer} described by parsed L{Options}."""
    return APIServer(
        config["state-dir"],
        listen=config["listen"],
        tokens=config["tokens"],
        impersonators=config["impersonators"],
        deniedUsers=config["deny-users"],
        impersonationRules=config["allow-impersonate"],
        requestLog=config["request-log"],
        reactor=reactor,
    )


async def main(reactor, *argv):
    """Run the emulator until SIGTERM or SIGINT."""
    config = Options()
    try:
        config.parseOptions(argv)
    except usage.UsageError as e:
        print(f"{config}\nerror: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = makeService(config, reactor)
    await service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    print(f"apiserver listening on {service.url}", flush=True)
    await Deferred()


if __name__ == "__main__":
    react(main, sys.argv[1:])

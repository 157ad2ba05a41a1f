"""Tests for the API server emulator (L{arc.testing.apiserver}).

Most tests start the emulator as a real process, on a port chosen by the
system on 127.0.0.1, and drive it with a real kubectl; a few check the
in-process service and the sans-I/O parts directly.
"""

import json
import os
import shutil
import sys

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from arc.testing.apiauth import (
    Authenticator,
    UserInfo,
    parseImpersonationRule,
    parseTokenSpec,
)
from arc.testing.apipatch import strategicMergePatch
from arc.testing.apiserver import APIServer
from arc.testing.apistatus import StatusError
from arc.testing.execfiles import PodFiles
from arc.testing.execsession import CLOSE, STATUS, STDIN, STDOUT, ExecSession, commandFor

PROJECT = FilePath(__file__).parent().parent()


def findKubectl(version="1.33"):
    """``kubectl.VERSION`` beside the ``kubectl`` on PATH, else C{None}."""
    found = shutil.which("kubectl")
    if found is None:
        return None
    path = os.path.join(os.path.dirname(os.path.realpath(found)), f"kubectl.{version}")
    return path if os.access(path, os.X_OK) else None


KUBECTL = findKubectl() or shutil.which("kubectl")
NO_KUBECTL = "kubectl is not on PATH" if KUBECTL is None else None

CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  color: {color}
"""

SUBJECT_ACCESS_REVIEW = """\
apiVersion: authorization.k8s.io/v1
kind: SubjectAccessReview
spec:
  user: {user}
  resourceAttributes: {{verb: impersonate, resource: {resource}, name: {name}}}
"""

POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  containers:
  - name: main
    image: busybox:1.36
"""


class Child(ProcessProtocol):
    """A child process whose output is collected; every wait has a deadline."""

    def __init__(self, stdin=None):
        self.out = b""
        self.err = b""
        self.code = None
        self.signal = None
        self.done = False
        self._stdin = stdin
        self._waiters = []

    def connectionMade(self):
        if self._stdin is not None:
            self.transport.write(self._stdin)
            self.transport.closeStdin()

    def outReceived(self, data):
        self.out += data
        self._check()

    def errReceived(self, data):
        self.err += data
        self._check()

    def processEnded(self, reason):
        self.code = reason.value.exitCode
        self.signal = reason.value.signal
        self.done = True
        self._check()

    def _check(self):
        for predicate, waiter in list(self._waiters):
            if predicate(self) or self.done:
                self._waiters.remove((predicate, waiter))
                waiter.callback(self)

    def waitFor(self, predicate, timeout, what):
        """Fire when C{predicate(self)} holds; fail after C{timeout} seconds."""
        if predicate(self):
            return succeed(self)
        waiter = Deferred(lambda d: self._waiters.remove((predicate, d)))
        self._waiters.append((predicate, waiter))

        def check(child):
            if not predicate(child):
                raise AssertionError(f"{what}: process ended first; {self.describe()}")
            return child

        def expired(result, seconds):
            return Failure(AssertionError(f"{what}: not within {seconds} s; {self.describe()}"))

        return waiter.addTimeout(timeout, reactor, onTimeoutCancel=expired).addCallback(check)

    def describe(self):
        ended = f"exit code {self.code}" if self.signal is None else f"signal {self.signal}"
        return f"{ended}, stdout {self.out!r}, stderr {self.err!r}"

    @inlineCallbacks
    def stop(self):
        """SIGTERM, then SIGKILL if the process is still there 5 s later."""
        for signal in ("TERM", "KILL"):
            if self.done:
                return
            self.transport.signalProcess(signal)
            try:
                yield self.waitFor(lambda c: c.done, 5, f"exit after SIG{signal}")
            except AssertionError:
                pass


def spawn(argv, stdin=None, env=None):
    child = Child(stdin)
    reactor.spawnProcess(child, argv[0], argv, env=env)
    return child


@inlineCallbacks
def waitUntil(predicate, what, timeout=10, interval=0.05):
    """Poll C{predicate()} until it holds; fail after C{timeout} seconds."""
    for _ in range(int(timeout / interval)):
        if predicate():
            return
        yield deferLater(reactor, interval, lambda: None)
    raise AssertionError(f"{what}: not within {timeout} s")


@inlineCallbacks
def run(argv, stdin=None, env=None, timeout=30):
    """Run a process to its end (killed after C{timeout} s) and return it."""
    child = spawn(argv, stdin, env)
    try:
        yield child.waitFor(lambda c: c.done, timeout, " ".join(argv))
    finally:
        yield child.stop()
    return child


class KubectlMixin:
    """Run the real kubectl against a kubeconfig, with a private cache.

    C{binary} picks another kubectl build (see L{findKubectl}); C{env} adds
    environment variables, such as ``KUBECTL_REMOTE_COMMAND_WEBSOCKETS``.
    """

    def kubectl(self, *args, stdin=None, token=None, binary=None, env=None):
        """A Deferred firing with the ended L{Child}."""
        if token is not None:
            args = ("--token", token) + args
        return run(self._argv(args, binary), stdin=stdin, env=self._env(env))

    def kubectlStream(self, *args, binary=None, env=None):
        """Start a long-running kubectl (watch, follow); it is killed at cleanup."""
        child = spawn(self._argv(args, binary), env=self._env(env))
        self.addCleanup(child.stop)
        return child

    def _argv(self, args, binary):
        return [
            binary or KUBECTL,
            "--kubeconfig",
            self.kubeconfig,
            "--cache-dir",
            self.cacheDir,
            *args,
        ]

    def _env(self, extra):
        return dict({"HOME": self.home, "PATH": os.environ.get("PATH", "")}, **(extra or {}))

    def setUpKubectl(self, kubeconfig):
        self.kubeconfig = kubeconfig
        self.cacheDir = self.mktemp()
        self.home = self.mktemp()
        os.makedirs(self.home)

    def manifest(self, text):
        path = FilePath(self.mktemp())
        path.setContent(text.encode("utf-8"))
        return path.path


class EmulatorProcessMixin(KubectlMixin):
    """The emulator started as a process for each test, with a request log."""

    emulatorArguments = (
        "--token", "admin-token=admin:system:masters",
        "--token", "bob-token=bob:devs",
        "--token", "carol-token=carol",
        "--token", "guard-token=guard",
        "--impersonator", "admin",
        "--impersonator", "guard",
        "--deny-user", "carol",
        "--allow-impersonate", "guard=alice",
        "--allow-impersonate", "guard=devs",
        "--allow-impersonate", "*=nobody",
    )  # fmt: skip

    @inlineCallbacks
    def setUp(self):
        stateDir = FilePath(self.mktemp())
        self.requestLog = FilePath(self.mktemp())
        argv = [
            sys.executable, "-m", "arc.testing.apiserver",
            "--state-dir", stateDir.path,
            "--listen", "tcp:0:interface=127.0.0.1",
            "--request-log", self.requestLog.path,
            *self.emulatorArguments,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=PROJECT.path)
        server = spawn(argv, env=env)
        self.addCleanup(server.stop)
        yield server.waitFor(
            lambda c: b"apiserver listening on https://127.0.0.1:" in c.out, 20, "emulator start"
        )
        self.port = int(stateDir.child("port").getContent())
        self.assertIn(b":%d" % (self.port,), server.out)
        self.setUpKubectl(stateDir.child("kubeconfig").path)

    def requests(self):
        if not self.requestLog.exists():
            return []
        return [json.loads(line) for line in self.requestLog.getContent().splitlines()]

    def waitForRequest(self, predicate, what):
        return waitUntil(lambda: any(predicate(r) for r in self.requests()), what)


class EmulatorProcessTests(EmulatorProcessMixin, TestCase):
    """The emulator as a process, driven by real kubectl."""

    skip = NO_KUBECTL

    @inlineCallbacks
    def test_getPods(self):
        """``get pods`` prints the server's table: the ``ticker`` pod, running."""
        child = yield self.kubectl("get", "pods")
        self.assertEqual(child.code, 0, child.describe())
        header, *rows = child.out.decode().splitlines()
        self.assertEqual(header.split(), ["NAME", "READY", "STATUS", "RESTARTS", "AGE"])
        self.assertEqual([r.split()[:4] for r in rows], [["ticker", "1/1", "Running", "0"]])

    @inlineCallbacks
    def test_getNamespacesAndConfigMaps(self):
        namespaces = yield self.kubectl("get", "namespaces", "-o", "name")
        self.assertIn(b"namespace/default\n", namespaces.out)
        self.assertIn(b"namespace/kube-system\n", namespaces.out)
        empty = yield self.kubectl("get", "configmaps")
        self.assertEqual(empty.code, 0, empty.describe())
        self.assertIn(b"No resources found in default namespace", empty.err)

    @inlineCallbacks
    def test_getPodJSON(self):
        child = yield self.kubectl("get", "pod", "ticker", "-o", "json")
        pod = json.loads(child.out)
        self.assertEqual((pod["kind"], pod["metadata"]["name"]), ("Pod", "ticker"))
        self.assertEqual(pod["status"]["phase"], "Running")

    @inlineCallbacks
    def test_watchSeesCreation(self):
        """A pod created after ``get pods -w`` started shows up in its output."""
        watch = self.kubectlStream("get", "pods", "-w")
        yield watch.waitFor(lambda c: b"ticker" in c.out, 10, "initial list")
        yield self.waitForRequest(lambda r: "watch=true" in r["query"], "the watch")
        created = yield self.kubectl("create", "-f", self.manifest(POD.format(name="watched")))
        self.assertEqual(created.code, 0, created.describe())
        yield watch.waitFor(lambda c: b"watched" in c.out, 10, "the new pod in the watch")

    @inlineCallbacks
    def test_watchEvents(self):
        """Creation, change and deletion of a config map arrive as watch events."""
        watch = self.kubectlStream("get", "configmaps", "-w", "--output-watch-events")
        yield self.waitForRequest(
            lambda r: "watch=true" in r["query"] and "configmaps" in r["path"], "the watch"
        )
        for color in ("blue", "green"):
            yield self.kubectl("apply", "-f", self.manifest(CONFIG_MAP.format(color=color)))
        yield self.kubectl("delete", "configmap", "settings")
        yield watch.waitFor(lambda c: b"DELETED" in c.out, 10, "the deletion in the watch")
        events = [line.split()[:2] for line in watch.out.decode().splitlines()[1:]]
        self.assertEqual(
            events, [["ADDED", "settings"], ["MODIFIED", "settings"], ["DELETED", "settings"]]
        )

    @inlineCallbacks
    def test_applyGetDelete(self):
        """Client-side apply creates, then patches; delete removes."""
        blue = self.manifest(CONFIG_MAP.format(color="blue"))
        green = self.manifest(CONFIG_MAP.format(color="green"))
        outputs = []
        for path in (blue, blue, green):
            child = yield self.kubectl("apply", "-f", path)
            self.assertEqual(child.code, 0, child.describe())
            outputs.append(child.out)
        self.assertEqual(
            outputs,
            [
                b"configmap/settings created\n",
                b"configmap/settings unchanged\n",
                b"configmap/settings configured\n",
            ],
        )
        got = yield self.kubectl("get", "configmap", "settings", "-o", "json")
        self.assertEqual(json.loads(got.out)["data"], {"color": "green"})
        listed = yield self.kubectl("get", "configmaps")
        self.assertEqual(listed.out.decode().splitlines()[1].split()[:2], ["settings", "1"])
        pod = yield self.kubectl("apply", "-f", self.manifest(POD.format(name="web")))
        self.assertEqual(pod.out, b"pod/web created\n", pod.describe())
        deleted = yield self.kubectl("delete", "configmap", "settings")
        self.assertEqual(deleted.out, b'configmap "settings" deleted\n', deleted.describe())
        gone = yield self.kubectl("get", "configmap", "settings")
        self.assertEqual(gone.code, 1)
        self.assertIn(b'configmaps "settings" not found', gone.err)

    @inlineCallbacks
    def test_logs(self):
        child = yield self.kubectl("logs", "ticker")
        self.assertEqual(child.code, 0, child.describe())
        self.assertEqual(len(child.out.splitlines()), 3)
        self.assertNotIn(b"tick 1", child.out)

    @inlineCallbacks
    def test_logsFollow(self):
        """``logs -f ticker`` keeps printing new lines while it runs."""
        follow = self.kubectlStream("logs", "-f", "ticker")
        yield follow.waitFor(lambda c: b"tick 1\n" in c.out, 10, "first tick")
        yield follow.waitFor(lambda c: b"tick 2\n" in c.out, 10, "second tick")
        self.assertFalse(follow.done)

    @inlineCallbacks
    def test_execEcho(self):
        child = yield self.kubectl("exec", "ticker", "--", "echo", "hi")
        self.assertEqual((child.code, child.out), (0, b"hi\n"), child.describe())

    @inlineCallbacks
    def test_execCatStdin(self):
        """``exec -i ... cat`` sends stdin and ends when stdin does."""
        child = yield self.kubectl("exec", "-i", "ticker", "--", "cat", stdin=b"hello\nworld\n")
        self.assertEqual((child.code, child.out), (0, b"hello\nworld\n"), child.describe())

    @inlineCallbacks
    def test_execExitCode(self):
        child = yield self.kubectl("exec", "ticker", "--", "sh", "-c", "exit 3")
        self.assertEqual(child.code, 3, child.describe())
        self.assertIn(b"command terminated with exit code 3", child.err)

    @inlineCallbacks
    def test_whoami(self):
        child = yield self.kubectl("auth", "whoami", "-o", "json")
        info = json.loads(child.out)["status"]["userInfo"]
        self.assertEqual(
            info, {"username": "admin", "groups": ["system:masters", "system:authenticated"]}
        )

    @inlineCallbacks
    def test_impersonation(self):
        """An impersonator acts as another user with several groups."""
        whoami = yield self.kubectl(
            "auth",
            "whoami",
            "-o",
            "json",
            "--as",
            "alice",
            "--as-group",
            "devs",
            "--as-group",
            "ops",
        )
        info = json.loads(whoami.out)["status"]["userInfo"]
        self.assertEqual(
            info, {"username": "alice", "groups": ["devs", "ops", "system:authenticated"]}
        )
        execWhoami = yield self.kubectl("exec", "ticker", "--as", "alice", "--", "whoami")
        self.assertEqual(execWhoami.out, b"alice\n", execWhoami.describe())
        [record] = [r for r in self.requests() if r["path"].endswith("/selfsubjectreviews")]
        self.assertEqual(record["user"]["username"], "admin")
        self.assertEqual(record["effective"]["username"], "alice")
        self.assertEqual(
            [v for n, v in record["headers"] if n.lower() == "impersonate-group"], ["devs", "ops"]
        )

    @inlineCallbacks
    def test_impersonationRefused(self):
        """Others get 403 for ``--as``.

        kubectl prints the server's message only for the request it was
        asked to make: refused discovery requests show as "unknown", so the
        discovery cache is filled first, as bob.
        """
        warm = yield self.kubectl("get", "pods", token="bob-token")
        self.assertEqual(warm.code, 0, warm.describe())
        child = yield self.kubectl("get", "pods", "--as", "alice", token="bob-token")
        self.assertEqual(child.code, 1, child.describe())
        self.assertIn(
            b'Error from server (Forbidden): users "alice" is forbidden: '
            b'User "bob" cannot impersonate resource "users"',
            child.err,
        )
        refused = [r for r in self.requests() if r["code"] == 403]
        self.assertEqual(
            {(r["user"]["username"], r["effective"]) for r in refused}, {("bob", None)}
        )

    @inlineCallbacks
    def test_badToken(self):
        child = yield self.kubectl("get", "pods", token="no-such-token")
        self.assertEqual(child.code, 1, child.describe())
        self.assertIn(b"You must be logged in to the server", child.err)
        self.assertTrue(all(r["code"] == 401 and r["user"] is None for r in self.requests()))

    @inlineCallbacks
    def test_deniedUser(self):
        """A denied user may ask who it is, and is refused everything else."""
        pods = yield self.kubectl("get", "pods", token="carol-token")
        self.assertEqual(pods.code, 1)
        self.assertIn(
            b'User "carol" cannot list resource "pods" in API group "" in the namespace "default"',
            pods.err,
        )
        whoami = yield self.kubectl("auth", "whoami", "-o", "json", token="carol-token")
        self.assertEqual(json.loads(whoami.out)["status"]["userInfo"]["username"], "carol")
        canI = yield self.kubectl("auth", "can-i", "get", "pods", token="carol-token")
        self.assertEqual(canI.out, b"no\n")


    def review(self, token, user, resource, name):
        """``create`` a SubjectAccessReview (the OpenAPI stub has no schema for it)."""
        manifest = SUBJECT_ACCESS_REVIEW.format(user=user, resource=resource, name=name)
        return self.kubectl(
            "create", "--validate=false", "-o", "json", "-f", self.manifest(manifest), token=token
        )

    @inlineCallbacks
    def test_subjectAccessReview(self):
        """An impersonator asks who may impersonate whom; ``--allow-impersonate`` answers."""
        questions = [
            ("guard", "users", "alice", True),
            ("guard", "groups", "devs", True),
            ("guard", "users", "bob", False),
            ("bob", "users", "alice", False),
            ("bob", "users", "nobody", True),
        ]
        for user, resource, name, allowed in questions:
            child = yield self.review("guard-token", user, resource, name)
            self.assertEqual(child.code, 0, child.describe())
            review = json.loads(child.out)
            self.assertEqual(review["kind"], "SubjectAccessReview")
            self.assertEqual(
                review["status"]["allowed"], allowed, f"{user} {resource} {name}: {review}"
            )
        self.assertEqual(
            review["status"]["reason"], "allowed by --allow-impersonate *=nobody"
        )
        masters = yield self.review("admin-token", "guard", "users", "bob")
        self.assertEqual(
            json.loads(masters.out)["status"]["reason"],
            'no --allow-impersonate rule lets "guard" impersonate users "bob"',
        )

    @inlineCallbacks
    def test_subjectAccessReviewRefused(self):
        """Neither impersonators nor in ``system:masters``: 403."""
        child = yield self.review("bob-token", "guard", "users", "alice")
        self.assertEqual(child.code, 1, child.describe())
        self.assertIn(
            b'subjectaccessreviews.authorization.k8s.io is forbidden: User "bob" cannot '
            b'create resource "subjectaccessreviews" in API group "authorization.k8s.io"',
            child.err,
        )


class _ExecClient(WebSocketClientProtocol):
    def onMessage(self, payload, isBinary):
        self.factory.messages.append(payload)

    def onClose(self, wasClean, code, reason):
        self.factory.closed.callback(None)


class InProcessTests(KubectlMixin, TestCase):
    """L{APIServer} started in the test's own reactor."""

    @inlineCallbacks
    def setUp(self):
        self.server = APIServer(self.mktemp(), tokens=dict([parseTokenSpec("t=tester:qa")]))
        port = yield self.server.startService()
        self.addCleanup(self.server.stopService)
        self.assertEqual(port, self.server.port)
        self.setUpKubectl(self.server.kubeconfig.path)

    @inlineCallbacks
    def test_kubectl(self):
        if NO_KUBECTL:
            raise self.skipTest(NO_KUBECTL)
        child = yield self.kubectl("get", "pods", "-o", "name")
        self.assertEqual(child.out, b"pod/ticker\n", child.describe())
        self.assertEqual(self.server.requests[-1]["user"]["username"], "tester")

    @inlineCallbacks
    def test_stopEndsStreams(self):
        """Stopping the service ends followed logs, watches, execs and port-forwards."""
        if NO_KUBECTL:
            raise self.skipTest(NO_KUBECTL)
        spdy = {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}
        execs = [
            self.kubectlStream("exec", "-i", "ticker", "--", "cat"),
            self.kubectlStream("exec", "-i", "ticker", "--", "cat", env=spdy),
        ]
        follow = self.kubectlStream("logs", "-f", "ticker")
        watch = self.kubectlStream("get", "pods", "-w")
        forward = self.kubectlStream(
            "port-forward", "--address", "127.0.0.1", "pod/ticker", ":8080"
        )
        streams = execs + [follow, watch, forward]
        for child in execs:
            # Echoed stdin shows the command runs: kubectl has all its streams.
            # Dropped while it waits for a SPDY stream's reply, it would hang.
            child.transport.write(b"ready\n")
            yield child.waitFor(lambda c: b"ready\n" in c.out, 10, "exec to run")
        yield follow.waitFor(lambda c: b"tick 1\n" in c.out, 10, "followed log")
        requests = self.server.requests
        yield waitUntil(lambda: any("watch=true" in r["query"] for r in requests), "watch")
        yield forward.waitFor(lambda c: b"Forwarding from" in c.out, 10, "port-forward")
        yield self.server.stopService()
        for child in streams:
            yield child.waitFor(lambda c: c.done, 10, "kubectl to end")

    @inlineCallbacks
    def test_execV4(self):
        """A client offering only ``v4.channel.k8s.io`` gets stdout and a status."""
        path = "/api/v1/namespaces/default/pods/ticker/exec?command=echo&command=v4&stdout=true"
        factory = WebSocketClientFactory(
            f"wss://127.0.0.1:{self.server.port}{path}",
            protocols=["v4.channel.k8s.io"],
            headers={"Authorization": "Bearer t"},
        )
        factory.protocol = _ExecClient
        factory.messages = []
        factory.closed = Deferred()
        ca = Certificate.loadPEM(
            FilePath(self.server.kubeconfig.dirname()).child("ca.crt").getContent()
        )
        tls = optionsForClientTLS("127.0.0.1", trustRoot=ca)
        yield SSL4ClientEndpoint(reactor, "127.0.0.1", self.server.port, tls).connect(factory)
        yield factory.closed.addTimeout(10, reactor)
        self.assertEqual(factory.messages[0], bytes([STDOUT]) + b"v4\n")
        self.assertEqual(json.loads(factory.messages[1][1:])["status"], "Success")


class ExecSessionTests(SynchronousTestCase):
    """The channel framing of emulated commands, without a network."""

    def session(self, *argv, stdin=False):
        self.sent = []
        self.closed = []
        command = commandFor(argv, "alice", PodFiles("pod"))
        return ExecSession(
            argv, command, self.sent.append, lambda: self.closed.append(True), stdin=stdin
        )

    def test_catUntilStdinClosed(self):
        session = self.session("cat", stdin=True)
        session.start()
        session.messageReceived(bytes([STDIN]) + b"abc")
        self.assertEqual((self.sent, self.closed), ([bytes([STDOUT]) + b"abc"], []))
        session.messageReceived(bytes([CLOSE, STDIN]))
        self.assertEqual(json.loads(self.sent[-1][1:]), {"metadata": {}, "status": "Success"})
        self.assertEqual((self.sent[-1][0], self.closed), (STATUS, [True]))

    def test_exitCode(self):
        self.session("sh", "-c", "exit 3").start()
        status = json.loads(self.sent[-1][1:])
        self.assertEqual((status["status"], status["reason"]), ("Failure", "NonZeroExitCode"))
        self.assertEqual(status["details"]["causes"], [{"reason": "ExitCode", "message": "3"}])

    def test_unknownCommand(self):
        self.session("nosuch").start()
        self.assertEqual(json.loads(self.sent[-1][1:])["details"]["causes"][0]["message"], "127")

    def test_lostConnectionSendsNothing(self):
        session = self.session("cat", stdin=True)
        session.start()
        session.connectionLost()
        self.assertEqual((self.sent, session.exitCode), ([], 0))


class AuthenticatorTests(SynchronousTestCase):
    def setUp(self):
        self.auth = Authenticator(
            {"t": UserInfo("root", ("admins",)), "u": UserInfo("user")}, impersonators=["root"]
        )

    def test_repeatedGroupsAndExtra(self):
        headers = Headers(
            {
                b"Authorization": [b"Bearer t"],
                b"Impersonate-User": [b"alice"],
                b"Impersonate-Group": [b"a", b"b,c"],
                b"Impersonate-Extra-Scopes%2Fx": [b"s1", b"s2"],
            }
        )
        user = self.auth.authenticate(headers)
        acting = self.auth.impersonate(user, headers)
        self.assertEqual(acting.groups, ("a", "b,c", "system:authenticated"))
        self.assertEqual(acting.extra, {"scopes/x": ("s1", "s2")})

    def test_refused(self):
        headers = Headers({b"Authorization": [b"Bearer u"], b"Impersonate-User": [b"alice"]})
        error = self.assertRaises(
            StatusError, self.auth.impersonate, self.auth.authenticate(headers), headers
        )
        self.assertEqual(error.code, 403)

    def test_reviewers(self):
        """Only impersonators and ``system:masters`` may review others' access."""
        self.auth.authorizeReviewer(UserInfo("root"))
        self.auth.authorizeReviewer(UserInfo("user", ("system:masters",)))
        error = self.assertRaises(StatusError, self.auth.authorizeReviewer, UserInfo("user"))
        self.assertEqual(error.code, 403)

    def test_impersonationRules(self):
        rules = ["guard=alice", "guard=system:serviceaccount:ns:robot", "*=nobody", "root=*"]
        auth = Authenticator({}, impersonationRules=[parseImpersonationRule(r) for r in rules])

        def allowed(user, resource, name, namespace=""):
            attributes = {"verb": "impersonate", "resource": resource, "name": name}
            if namespace:
                attributes["namespace"] = namespace
            return auth.reviewImpersonation({"user": user, "resourceAttributes": attributes})[0]

        self.assertTrue(allowed("guard", "users", "alice"))
        self.assertTrue(allowed("guard", "groups", "alice"))
        self.assertFalse(allowed("guard", "users", "bob"))
        self.assertTrue(allowed("anyone", "users", "nobody"))
        self.assertTrue(allowed("guard", "serviceaccounts", "robot", "ns"))
        self.assertFalse(allowed("guard", "serviceaccounts", "robot", "other"))
        self.assertFalse(allowed("guard", "uids", "1234"))
        self.assertTrue(allowed("root", "userextras", "scopes"))
        allowed, reason = auth.reviewImpersonation(
            {"user": "root", "resourceAttributes": {"verb": "get", "resource": "pods"}}
        )
        self.assertFalse(allowed)
        self.assertIn("only verb=impersonate", reason)

    def test_unknownToken(self):
        error = self.assertRaises(
            StatusError, self.auth.authenticate, Headers({b"Authorization": [b"Bearer x"]})
        )
        self.assertEqual(error.status()["reason"], "Unauthorized")


class StrategicMergePatchTests(SynchronousTestCase):
    def test_containersMergeByName(self):
        pod = {
            "spec": {"containers": [{"name": "a", "image": "x:1"}, {"name": "b", "image": "y:1"}]}
        }
        patch = {
            "metadata": {"labels": {"l": "v"}},
            "spec": {
                "$setElementOrder/containers": [{"name": "a"}],
                "containers": [{"name": "a", "image": "x:2"}, {"name": "b", "$patch": "delete"}],
            },
        }
        self.assertEqual(
            strategicMergePatch(pod, patch),
            {
                "metadata": {"labels": {"l": "v"}},
                "spec": {"containers": [{"name": "a", "image": "x:2"}]},
            },
        )

    def test_nullDeletes(self):
        self.assertEqual(
            strategicMergePatch({"data": {"a": "1", "b": "2"}}, {"data": {"a": None}}),
            {"data": {"b": "2"}},
        )

"""HTTP face of the API server emulator: one twisted.web resource.

L{APIResource} authenticates every request, applies impersonation, records
the request, routes it to discovery, the object store, pod logs, the
upgrades of exec, attach and port-forward (L{arc.testing.apiupgrade}) or the
access-review endpoints, and answers failures with Kubernetes ``Status``
bodies.  Watches and followed logs are chunked responses written
as events happen; each one is kept in a set of streams so that a stopping
server can end them.
"""

import json
from urllib.parse import unquote

import yaml
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from arc.testing import apiresources as resources
from arc.testing.apipatch import mergePatch, strategicMergePatch
from arc.testing.apiresources import PODS, nowUTC, parseCorePath, table
from arc.testing.apistatus import (
    StatusError,
    badRequest,
    methodNotAllowed,
    pathNotFound,
    unsupportedMediaType,
)
from arc.testing.apistore import selectorMatcher
from arc.testing.apiupgrade import negotiatedProtocol, portForward, remoteCommand, upgradeKind
from arc.testing.execfiles import PodFiles
from arc.testing.execsession import ExecSession, LineEcho, commandFor
from arc.testing.podlogs import LogFollower, LogFormat, fixedLines, tickInterval
from arc.testing.portforward import PortForwardHandler

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

_PATCHES = {
    MERGE_PATCH: mergePatch,
    STRATEGIC_PATCH: strategicMergePatch,
    APPLY_PATCH: strategicMergePatch,
}


class RequestLog:
    """Every request the emulator answered, in memory and optionally on disk.

    Each record holds ``method``, ``path``, ``query``, ``headers`` (a list of
    ``[name, value]`` pairs, one per header line, repeats kept), ``user``
    (the authenticated identity, or C{None}), ``effective`` (the identity
    after impersonation), the response ``code`` (101 for a connection handed
    over to WebSocket or SPDY), ``upgrade`` (the lower-cased ``Upgrade``
    header: ``websocket``, ``spdy/3.1`` or C{None}) and ``protocol`` (the
    subprotocol or stream protocol chosen for an upgrade, or C{None}).

    @param path: a file to append one JSON line per request to, or C{None}.
    """

    def __init__(self, path=None):
        self.records = []
        self._path = path
        self._file = None

    def open(self):
        """Start appending to the file, if there is one."""
        if self._path:
            self._file = open(self._path, "a", encoding="utf-8")

    def add(self, record):
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class _Stream:
    """A chunked response left open: a watch or a followed log."""

    def __init__(self, request, streams, onEnd):
        self._request = request
        self._streams = streams
        self._onEnd = onEnd
        self._open = True
        streams.add(self)
        request.notifyFinish().addBoth(self._ended)

    def _ended(self, reason):
        self._open = False
        self._streams.discard(self)
        self._onEnd()

    def finish(self):
        """End the response, keeping the connection (a watch timed out)."""
        if self._open:
            self._request.finish()

    def stopStreaming(self):
        """End the response and the connection: the server is stopping."""
        if self._open:
            channel = self._request.channel
            self._request.finish()
            channel.loseConnection()


class APIResource(Resource):
    """The whole emulated API: a leaf resource that routes by path.

    @param store: the L{arc.testing.apistore.ObjectStore}.
    @param authenticator: the L{arc.testing.apiauth.Authenticator}.
    @param requestLog: a L{RequestLog}.
    @param reactor: provides C{seconds} and C{callLater}.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, store, authenticator, requestLog, reactor):
        super().__init__()
        self._store = store
        self._auth = authenticator
        self._requestLog = requestLog
        self._reactor = reactor
        self._files = {}
        self.streams = set()

    def render(self, request):
        record = {
            "time": self._reactor.seconds(),
            "method": request.method.decode("ascii"),
            "path": request.path.decode("latin-1"),
            "query": request.uri.partition(b"?")[2].decode("latin-1"),
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            "user": None,
            "effective": None,
            "upgrade": upgradeKind(request),
        }
        try:
            user = self._auth.authenticate(request.requestHeaders)
            record["user"] = user.toJSON()
            effective = self._auth.impersonate(user, request.requestHeaders)
            record["effective"] = effective.toJSON()
            result = self._route(request, effective)
        except StatusError as e:
            result = _json(request, e.code, e.status())
        except Exception:
            self.log.failure(
                "internal error answering {method} {path}",
                method=record["method"],
                path=record["path"],
            )
            result = _json(
                request, 500, StatusError(500, "InternalError", "internal error").status()
            )
        record["code"] = request.code
        record["protocol"] = negotiatedProtocol(request) if request.code == 101 else None
        self._requestLog.add(record)
        self.log.info(
            "{method} {path} as {user}: {code}",
            method=record["method"],
            path=record["path"],
            user=(record["effective"] or {}).get("username"),
            code=request.code,
        )
        return result

    def _route(self, request, user):
        segments = [unquote(s) for s in request.path.decode("latin-1").split("/") if s]
        head, rest = (segments[0], segments[1:]) if segments else ("", [])
        if head == "api" and len(rest) > 1 and rest[0] == "v1":
            target = parseCorePath(rest[1:])
            if target is None:
                raise pathNotFound()
            return self._core(request, user, target)
        if head == "apis" and len(rest) == 3:
            return self._review(request, user, *rest)
        if request.method != b"GET":
            raise methodNotAllowed()
        if head in ("healthz", "livez", "readyz") and not rest:
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"ok"
        document = self._discovery(request, head, rest)
        if document is None:
            raise pathNotFound()
        return _json(request, 200, document)

    def _discovery(self, request, head, rest):
        """Version and discovery documents, or C{None} if there is none."""
        if head == "version" and not rest:
            return resources.VERSION
        if head == "api" and not rest:
            return resources.apiVersions(f"127.0.0.1:{request.getHost().port}")
        if head == "api" and rest == ["v1"]:
            return resources.apiResourceList("", "v1")
        if head == "apis" and not rest:
            return resources.apiGroupList()
        if head == "apis" and len(rest) == 1:
            return resources.apiGroup(rest[0])
        if head == "apis" and len(rest) == 2:
            return resources.apiResourceList(*rest)
        if head == "openapi" and rest == ["v3"]:
            return resources.openAPIRoot()
        if head == "openapi" and rest == ["v3", "api", "v1"]:
            return resources.openAPIDocument()
        return None

    def _review(self, request, user, group, version, resource):
        """``auth whoami``, ``auth can-i`` and access reviews of other users."""
        if request.method != b"POST":
            raise methodNotAllowed()
        if (group, version, resource) == ("authentication.k8s.io", "v1", "selfsubjectreviews"):
            review = {
                "kind": "SelfSubjectReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "status": {"userInfo": user.toJSON()},
            }
            return _json(request, 201, review)
        if (group, version, resource) == ("authorization.k8s.io", "v1", "selfsubjectaccessreviews"):
            readable = _contentType(request).endswith(("json", "yaml"))
            spec = _jsonBody(request).get("spec", {}) if readable else {}
            review = {
                "kind": "SelfSubjectAccessReview",
                "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "spec": spec,
                "status": {"allowed": self._auth.mayAct(user)},
            }
            return _json(request, 201, review)
        if (group, version, resource) == ("authorization.k8s.io", "v1", "subjectaccessreviews"):
            self._auth.authorizeReviewer(user)
            spec = _jsonBody(request).get("spec", {})
            allowed, reason = self._auth.reviewImpersonation(spec)
            review = {
                "kind": "SubjectAccessReview",
                "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "spec": spec,
                "status": {"allowed": allowed, "reason": reason},
            }
            return _json(request, 201, review)
        raise pathNotFound()

    def _core(self, request, user, target):
        """Objects of the core group: list, watch, CRUD, logs, exec, attach, port-forward."""
        method, rt = request.method, target.resourceType
        verb = _verb(method, target, _arg(request, "watch") in ("true", "1"))
        resource = f"{rt.name}/{target.subresource}" if target.subresource else rt.name
        self._auth.authorize(user, verb, resource, target.namespace, target.name)
        if target.subresource == "log" and method == b"GET":
            return self._logs(request, target)
        if target.subresource == "exec" and method in (b"GET", b"POST"):
            return self._exec(request, user, target)
        if target.subresource == "attach" and method in (b"GET", b"POST"):
            return self._attach(request, target)
        if target.subresource == "portforward" and method in (b"GET", b"POST"):
            return self._portForward(request, target)
        if target.subresource:
            raise badRequest(f"{resource} is not supported by the API server emulator")
        if bool(target.name) != (verb in ("get", "update", "patch", "delete")):
            raise methodNotAllowed()
        if verb == "watch":
            return self._watch(request, target)
        if verb == "list":
            return self._list(request, target)
        if verb == "get":
            obj = self._store.get(rt, target.namespace, target.name)
            return _json(request, 200, self._table(rt, [obj]) if _wantsTable(request) else obj)
        if verb == "create":
            return _json(request, 201, self._store.create(rt, target.namespace, _jsonBody(request)))
        if verb == "update":
            return _json(
                request,
                200,
                self._store.update(rt, target.namespace, target.name, _jsonBody(request)),
            )
        if verb == "patch":
            return self._patch(request, target)
        if verb == "delete":
            return _json(request, 200, self._store.delete(rt, target.namespace, target.name))
        raise methodNotAllowed()

    def _table(self, resourceType, objects):
        now = nowUTC(self._reactor.seconds)
        return table(resourceType, objects, self._store.resourceVersion, now)

    def _list(self, request, target):
        rt = target.resourceType
        items = self._store.list(rt, target.namespace, _matcher(request))
        if _wantsTable(request):
            return _json(request, 200, self._table(rt, items))
        body = {
            "kind": f"{rt.kind}List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._store.resourceVersion)},
            "items": items,
        }
        return _json(request, 200, body)

    def _watch(self, request, target):
        """A chunked stream of ``{"type": ..., "object": ...}`` lines."""
        rt, asTable = target.resourceType, _wantsTable(request)
        request.setResponseCode(200)
        request.setHeader(b"content-type", JSON.encode())

        def deliver(eventType, obj):
            if asTable:
                obj = self._table(rt, [obj])
            request.write(json.dumps({"type": eventType, "object": obj}).encode() + b"\n")

        since = _arg(request, "resourceVersion")
        watch = self._store.watch(rt, target.namespace, since, _matcher(request), deliver)
        request.write(b"")
        timers = []

        def ended():
            watch.cancel()
            for timer in timers:
                if timer.active():
                    timer.cancel()

        stream = _Stream(request, self.streams, ended)
        timeout = _arg(request, "timeoutSeconds")
        if timeout.isdigit():
            timers.append(self._reactor.callLater(int(timeout), stream.finish))
        return NOT_DONE_YET

    def _patch(self, request, target):
        rt, namespace, name = target.resourceType, target.namespace, target.name
        contentType = _contentType(request)
        if contentType not in _PATCHES:
            raise unsupportedMediaType(contentType)
        patch = _jsonBody(request)
        if contentType == APPLY_PATCH and not self._store.contains(rt, namespace, name):
            return _json(request, 201, self._store.create(rt, namespace, patch))
        apply = _PATCHES[contentType]
        return _json(
            request,
            200,
            self._store.patch(rt, namespace, name, lambda current: apply(current, patch)),
        )

    def _pod(self, request, target):
        """The pod a subresource request names, and its chosen container."""
        pod = self._store.get(PODS, target.namespace, target.name)
        containers = [c.get("name") for c in pod.get("spec", {}).get("containers", [])]
        container = _arg(request, "container") or (containers[0] if containers else "")
        if container not in containers:
            raise badRequest(f"container {container} is not valid for pod {target.name}")
        return pod, container

    def _logs(self, request, target):
        pod, container = self._pod(request, target)
        logFormat = LogFormat(self._reactor.seconds, _arg(request, "timestamps") == "true")
        lines = fixedLines(pod, container)
        tail = _arg(request, "tailLines")
        if tail.isdigit():
            lines = lines[len(lines) - int(tail) :] if int(tail) else []
        request.setHeader(b"content-type", b"text/plain")
        if _arg(request, "follow") not in ("true", "1"):
            return logFormat.render(lines)
        request.write(logFormat.render(lines))
        follower = LogFollower(request, pod, container, logFormat, tickInterval(pod), self._reactor)
        _Stream(request, self.streams, follower.stop)
        return NOT_DONE_YET

    def _podFiles(self, pod):
        """The file system of C{pod}; a pod created anew starts a fresh one."""
        metadata = pod["metadata"]
        if metadata["uid"] not in self._files:
            self._files[metadata["uid"]] = PodFiles(metadata["name"])
        return self._files[metadata["uid"]]

    def _exec(self, request, user, target):
        """Run an emulated command over WebSocket or SPDY."""
        pod, _ = self._pod(request, target)
        argv = [a.decode("utf-8") for a in request.args.get(b"command", [])]
        if not argv:
            raise badRequest("you must specify at least 1 command")
        command = commandFor(argv, user.username, self._podFiles(pod))
        return self._remoteCommand(request, argv, command)

    def _attach(self, request, target):
        """Attach to the pod's main process, which echoes stdin lines."""
        _, container = self._pod(request, target)
        return self._remoteCommand(request, ["attach", f"{target.name}/{container}"], LineEcho())

    def _remoteCommand(self, request, argv, command):
        stdin, stdout, stderr, tty = (
            _arg(request, name) in ("true", "1") for name in ("stdin", "stdout", "stderr", "tty")
        )

        def newSession(send, close):
            return ExecSession(argv, command, send, close, stdin=stdin, tty=tty)

        return remoteCommand(request, newSession, self.streams, stdin, stdout, stderr, tty)

    def _portForward(self, request, target):
        """Forward connections to the pod's emulated services."""
        metadata = self._store.get(PODS, target.namespace, target.name)["metadata"]
        name, uid = metadata["name"], metadata["uid"]
        return portForward(
            request, lambda session: PortForwardHandler(session, name, uid), self.streams
        )


def _verb(method, target, watch):
    """The RBAC verb of a request on C{target}."""
    if target.subresource in ("exec", "attach", "portforward"):
        return "create"
    if method == b"GET":
        if target.name:
            return "get"
        return "watch" if watch else "list"
    return {b"POST": "create", b"PUT": "update", b"PATCH": "patch", b"DELETE": "delete"}.get(
        method, "unknown"
    )


def _arg(request, name, default=""):
    values = request.args.get(name.encode("ascii"))
    return values[0].decode("utf-8") if values else default


def _matcher(request):
    return selectorMatcher(_arg(request, "fieldSelector"), _arg(request, "labelSelector"))


def _wantsTable(request):
    """Whether the client asked for ``meta.k8s.io/v1`` ``Table`` output."""
    return b"as=Table" in (request.getHeader(b"accept") or b"")


def _contentType(request):
    return (
        (request.getHeader(b"content-type") or JSON.encode())
        .decode("latin-1")
        .split(";")[0]
        .strip()
        .lower()
    )


def _jsonBody(request):
    """The request body as an object: JSON, or YAML for YAML media types.

    @raise StatusError: 415 for other encodings (such as protobuf), 400
        when the body cannot be parsed or is not an object.
    """
    contentType = _contentType(request)
    raw = request.content.read()
    if contentType.endswith("yaml"):
        parse = yaml.safe_load
    elif contentType.endswith("json"):
        parse = json.loads
    else:
        raise unsupportedMediaType(contentType)
    try:
        body = parse(raw) if raw.strip() else {}
    except (ValueError, yaml.YAMLError) as e:
        raise badRequest(f"the request body could not be decoded: {e}") from None
    if not isinstance(body, dict):
        raise badRequest("the request body must be an object")
    return body


def _json(request, code, body):
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON.encode())
    return json.dumps(body).encode("utf-8") + b"\n"

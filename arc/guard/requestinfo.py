"""What a Kubernetes API request asks for, from its method and target alone.

:func:`request_info` reads a request the way kube-apiserver's
``RequestInfoFactory`` does, so the audit log names the verb, resource and
object the API server's authorizer will see:

- ``/api/VERSION/...`` (core group) and ``/apis/GROUP/VERSION/...`` are
  resource requests; every other path (``/version``, ``/healthz``,
  ``/openapi/v2``, ``/api``, ``/apis/GROUP/VERSION``) is a non-resource
  request whose verb is the lower-case HTTP method.
- After the version: an optional legacy verb segment (``watch`` or
  ``proxy``), then ``namespaces/NS/`` (unless followed by a namespace
  subresource: ``/api/v1/namespaces/NS/status`` is the namespace itself),
  then ``RESOURCE/NAME/SUBRESOURCE``; segments after the subresource are
  not interpreted.
- POST is ``create``, GET and HEAD ``get``, PUT ``update``, PATCH ``patch``,
  DELETE ``delete``; a GET without a name is ``list`` or, with a ``watch``
  query parameter other than ``0``/``false``, ``watch``; a DELETE without a
  name is ``deletecollection``.  A ``list``/``watch`` whose field selector
  pins ``metadata.name`` carries that name.
- exec, attach and port-forward keep the verb of their method, as in
  Kubernetes: ``create`` for POST (SPDY), ``get`` for GET (WebSocket).
  :attr:`RequestInfo.is_connect` marks them; the upgrade kind comes from
  the headers, which the caller reads.

The path is percent-decoded before it is split, as kube-apiserver does.  The
function never raises: a target it cannot read is a non-resource request.
It runs for every request, so it only splits and compares strings.
"""

from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

_METHOD_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update",
                 "PATCH": "patch", "DELETE": "delete"}
_PATH_VERBS = frozenset(("watch", "proxy"))
_NAMESPACE_SUBRESOURCES = frozenset(("status", "finalize"))
#: Pod subresources that open a stream to a container (an upgraded connection).
CONNECT_SUBRESOURCES = frozenset(("exec", "attach", "portforward"))


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The attributes of one request, named as in Kubernetes authorization.

    ``api_group`` is ``""`` for the core group; ``namespace`` is ``""`` for
    cluster-scoped requests; ``path`` is the percent-decoded path.
    """

    is_resource_request: bool
    verb: str
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""

    @property
    def is_connect(self):
        """True for pods/exec, pods/attach and pods/portforward."""
        return (self.resource == "pods" and self.subresource in CONNECT_SUBRESOURCES
                and self.api_group == "" and self.is_resource_request)


#: Answers remembered for recent targets: kubectl asks for the same URLs again and again.
_CACHE = {}
CACHE_SIZE = 1024
CACHE_TARGET_LENGTH = 1024


def request_info(method, target):
    """The :class:`RequestInfo` of a request line's ``method`` and ``target``.

    Both may be ``str`` or ``bytes`` (decoded as ISO-8859-1, as
    :mod:`arc.guard.http1` decodes heads).  ``target`` is the origin form
    (``/api/v1/pods?watch=1``) or the absolute form (``https://host/api``).
    """
    if type(method) is not str or type(target) is not str or len(target) > CACHE_TARGET_LENGTH:
        return _request_info(method, target)
    key = (method, target)
    info = _CACHE.get(key)
    if info is None:
        info = _CACHE[key] = _request_info(method, target)
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.clear()
    return info


def _request_info(method, target):
    if isinstance(method, bytes):
        method = method.decode("latin-1")
    if isinstance(target, bytes):
        target = target.decode("latin-1")
    raw_path, _, query = target.partition("?")
    path = unquote(_origin_path(raw_path), errors="replace")
    other = RequestInfo(False, method.lower(), path=path)
    parts = path.strip("/").split("/")
    if not path.startswith("/") or len(parts) < 3:
        return other
    if parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return other

    if rest[0] in _PATH_VERBS:
        if len(rest) < 2:
            return other            # kube-apiserver rejects these outright
        verb, rest = rest[0], rest[1:]
    else:
        verb = _METHOD_VERBS.get(method, "")
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 and verb != "proxy" else ""

    if not name and verb == "get":
        verb, name = _list_or_watch(query)
    elif not name and verb == "delete":
        verb = "deletecollection"
    return RequestInfo(True, verb, group, version, namespace, resource, subresource, name, path)


def _origin_path(raw):
    """The path of an origin-form or absolute-form target, still encoded."""
    if raw.startswith("/"):
        return raw
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return raw
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"


def _list_or_watch(query):
    """``(verb, name)`` for a GET on a collection, from its query string."""
    watch = selector = None
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        key = unquote_plus(key)
        if key == "watch" and watch is None:
            watch = unquote_plus(value)
        elif key == "fieldSelector" and selector is None:
            selector = unquote_plus(value)
    verb = "list" if watch is None or watch == "0" or watch.lower() == "false" else "watch"
    return verb, _selected_name(selector) if selector else ""


def _selected_name(selector):
    """The name a field selector requires ``metadata.name`` to equal, or "".

    Terms are ``FIELD=VALUE``, ``FIELD==VALUE`` or ``FIELD!=VALUE``,
    separated by unescaped commas; values escape ``\\``, ``,`` and ``=``
    with a backslash.  A selector that does not parse yields "", as does a
    name that could not be a path segment.
    """
    name = None
    for term in sorted(_split_unescaped(selector)):
        if not term:
            continue
        bang, equals = term.find("!="), term.find("=")
        if bang >= 0 and bang < equals:
            field, op, value = term[:bang], "!=", term[bang + 2:]
        elif equals >= 0:
            op = "==" if term.startswith("==", equals) else "="
            field, value = term[:equals], term[equals + len(op):]
        else:
            return ""
        value = _unescape(value)
        if value is None:
            return ""
        if name is None and field == "metadata.name" and op != "!=":
            name = value
    if not name or name in (".", "..") or "/" in name or "%" in name:
        return ""
    return name


def _split_unescaped(selector):
    """``selector`` split on the commas not preceded by a backslash escape."""
    if "\\" not in selector:
        return selector.split(",")
    terms, start, escaped = [], 0, False
    for i, char in enumerate(selector):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return terms


def _unescape(value):
    """A selector value with its escapes resolved, or None if it is malformed."""
    if "\\" not in value and "," not in value and "=" not in value:
        return value
    out, escaped = [], False
    for char in value:
        if escaped:
            if char not in "\\,=":
                return None
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in ",=":
            return None
        else:
            out.append(char)
    return None if escaped else "".join(out)

"""The API server emulator's objects: an in-memory store with watches.

Every change bumps one cluster-wide ``resourceVersion`` and is kept in a
bounded history, so a watch started from the version a list returned sees
every change made since, as the real API server guarantees.  The store
touches no sockets and no reactor; the clock is injected.
"""

import copy
import secrets
import time
import uuid
from collections import deque

from arc.testing.apiresources import NAMESPACES, nowUTC, timestamp
from arc.testing.apistatus import (
    StatusError,
    alreadyExists,
    badRequest,
    conflict,
    invalid,
    notFound,
)

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"


def selectorMatcher(fieldSelector="", labelSelector=""):
    """A predicate on objects for ``fieldSelector`` and ``labelSelector``.

    Both accept comma-separated ``key=value``, ``key==value`` and
    ``key!=value`` terms; label selectors also accept ``key`` and ``!key``.
    Field keys are dotted paths into the object (``metadata.name``).

    @raise StatusError: 400 for a term that cannot be parsed.
    """
    terms = [(_fieldValue, t) for t in _split(fieldSelector)]
    terms += [(_labelValue, t) for t in _split(labelSelector)]
    tests = [_term(lookup, text) for lookup, text in terms]
    return lambda obj: all(test(obj) for test in tests)


def _split(selector):
    return [t.strip() for t in selector.split(",") if t.strip()]


def _term(lookup, text):
    for operator, wanted in (("!=", False), ("==", True), ("=", True)):
        key, sep, value = text.partition(operator)
        if sep:
            return lambda obj: (lookup(obj, key.strip()) == value.strip()) == wanted
    if lookup is _labelValue and text.startswith("!"):
        return lambda obj: lookup(obj, text[1:]) is None
    if lookup is _labelValue:
        return lambda obj: lookup(obj, text) is not None
    raise badRequest(f'invalid selector: "{text}"; only =, == and != are supported')


def _fieldValue(obj, path):
    value = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else str(value)


def _labelValue(obj, key):
    return (obj.get("metadata", {}).get("labels") or {}).get(key)


class Watch:
    """A registered interest in changes; call L{cancel} when done."""

    def __init__(self, resource, namespace, matches, deliver, unregister):
        self._unregister = unregister
        self.resource = resource
        self.namespace = namespace
        self.matches = matches
        self.deliver = deliver

    def wants(self, resource, obj):
        """Whether an event about C{obj} belongs to this watch."""
        return (
            resource == self.resource
            and (not self.namespace or obj["metadata"].get("namespace") == self.namespace)
            and self.matches(obj)
        )

    def cancel(self):
        """Deliver nothing more."""
        self._unregister(self)


class ObjectStore:
    """Objects keyed by resource, namespace and name.

    @param clock: returns the current time as POSIX seconds.
    @param historySize: how many changes a late watch can still replay.
    """

    def __init__(self, clock=time.time, historySize=1000):
        self._clock = clock
        self._objects = {}
        self._resourceVersion = 0
        self._history = deque(maxlen=historySize)
        self._watches = set()

    @property
    def resourceVersion(self):
        """The version of the latest change, as lists report it."""
        return self._resourceVersion

    def list(self, resourceType, namespace="", matches=lambda obj: True):
        """Copies of the matching objects, ordered by namespace and name."""
        return [
            copy.deepcopy(obj)
            for (resource, ns, _), obj in sorted(self._objects.items())
            if resource == resourceType.name and (not namespace or ns == namespace) and matches(obj)
        ]

    def contains(self, resourceType, namespace, name):
        """Whether the object exists."""
        return (resourceType.name, namespace, name) in self._objects

    def get(self, resourceType, namespace, name):
        """A copy of one object.

        @raise StatusError: 404 when it does not exist.
        """
        return copy.deepcopy(self._lookup(resourceType, namespace, name))

    def create(self, resourceType, namespace, obj):
        """Store a new object and return what was stored.

        @raise StatusError: 404 for a missing namespace, 409 for a taken
            name, 422 for an object without a name.
        """
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)[:5]
        name = metadata.get("name")
        if not name:
            raise invalid(
                resourceType.kind,
                "",
                "metadata.name: Required value: name or generateName is required",
            )
        if resourceType.namespaced:
            if (NAMESPACES.name, "", namespace) not in self._objects:
                raise notFound(NAMESPACES.name, namespace)
            metadata["namespace"] = namespace
        key = (resourceType.name, namespace, name)
        if key in self._objects:
            raise alreadyExists(resourceType.name, name)
        now = timestamp(nowUTC(self._clock))
        obj["kind"] = resourceType.kind
        obj["apiVersion"] = "v1"
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = now
        resourceType.initialize(obj, now)
        return self._commit(resourceType, key, obj, ADDED)

    def update(self, resourceType, namespace, name, obj):
        """Replace an object (``PUT``), checking ``resourceVersion`` if set.

        Identity, creation time and status stay the server's.  Replacing an
        object by an equal one changes nothing and notifies no watch.

        @raise StatusError: 404 when it does not exist, 409 when the
            given ``resourceVersion`` is not the stored one, 400 when the
            body names another object.
        """
        current = self._lookup(resourceType, namespace, name)
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        if metadata.get("name", name) != name:
            raise badRequest(
                f'the name of the object ({metadata["name"]}) '
                f"does not match the name on the URL ({name})"
            )
        sentVersion = metadata.get("resourceVersion")
        if sentVersion and sentVersion != current["metadata"]["resourceVersion"]:
            raise conflict(
                resourceType.name,
                name,
                "the object has been modified; "
                "please apply your changes to the latest version and try again",
            )
        for preserved in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion"):
            if preserved in current["metadata"]:
                metadata[preserved] = current["metadata"][preserved]
        obj["kind"] = resourceType.kind
        obj["apiVersion"] = "v1"
        obj.pop("status", None)
        if "status" in current:
            obj["status"] = copy.deepcopy(current["status"])
        if obj == current:
            return copy.deepcopy(current)
        return self._commit(resourceType, (resourceType.name, namespace, name), obj, MODIFIED)

    def patch(self, resourceType, namespace, name, apply):
        """Replace an object with C{apply(copy of current)}."""
        return self.update(
            resourceType, namespace, name, apply(self.get(resourceType, namespace, name))
        )

    def delete(self, resourceType, namespace, name):
        """Remove an object and return it as it was last stored.

        @raise StatusError: 404 when it does not exist.
        """
        key = (resourceType.name, namespace, name)
        obj = copy.deepcopy(self._lookup(resourceType, namespace, name))
        del self._objects[key]
        self._resourceVersion += 1
        obj["metadata"]["resourceVersion"] = str(self._resourceVersion)
        self._publish(resourceType.name, DELETED, obj)
        return copy.deepcopy(obj)

    def watch(self, resourceType, namespace, since, matches, deliver):
        """Call C{deliver(eventType, obj)} for each matching change.

        @param since: a ``resourceVersion`` string: changes after it are
            replayed from history first; empty or ``"0"`` starts with an
            ``ADDED`` event for every matching object.
        @raise StatusError: 410 when history no longer reaches back to
            C{since}; 400 when it is not a version.
        @return: a L{Watch}.
        """
        watch = Watch(resourceType.name, namespace, matches, deliver, self._watches.discard)
        if since in ("", "0"):
            backlog = [(ADDED, obj) for obj in self.list(resourceType, namespace, matches)]
        else:
            backlog = [
                (t, copy.deepcopy(o)) for _, r, t, o in self._replay(since) if watch.wants(r, o)
            ]
        self._watches.add(watch)
        for eventType, obj in backlog:
            deliver(eventType, obj)
        return watch

    def _replay(self, since):
        try:
            since = int(since)
        except ValueError:
            raise badRequest(f'invalid resource version "{since}"') from None
        oldest = self._history[0][0] if self._history else self._resourceVersion + 1
        if since < oldest - 1 and len(self._history) == self._history.maxlen:
            raise StatusError(410, "Expired", f"too old resource version: {since} ({oldest - 1})")
        return [entry for entry in self._history if entry[0] > since]

    def _lookup(self, resourceType, namespace, name):
        obj = self._objects.get((resourceType.name, namespace, name))
        if obj is None:
            raise notFound(resourceType.name, name)
        return obj

    def _commit(self, resourceType, key, obj, eventType):
        self._resourceVersion += 1
        obj["metadata"]["resourceVersion"] = str(self._resourceVersion)
        self._objects[key] = obj
        self._publish(resourceType.name, eventType, obj)
        return copy.deepcopy(obj)

    def _publish(self, resource, eventType, obj):
        self._history.append((self._resourceVersion, resource, eventType, copy.deepcopy(obj)))
        for watch in list(self._watches):
            if watch.wants(resource, obj):
                watch.deliver(eventType, copy.deepcopy(obj))

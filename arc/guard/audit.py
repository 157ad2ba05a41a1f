"""The guard's audit log: one JSON line per request, and never a token.

An :class:`AuditRecord` collects what the guard learnt about one request
(who asked, as whom it was forwarded, what it asked for, how it ended); an
:class:`AuditLog` serializes it and appends it to the destination.

Writing happens in the reactor thread.  Records are queued and written one
batch per reactor turn (the first record of a turn schedules a
``callLater(0)``), as one ``write`` call on an unbuffered file, so every
write ends on a line boundary and nothing waits in a buffer.  A local file
or a pipe accepts such a write at once; only a reader that stops draining
stdout for long enough to fill its pipe could stall the reactor.  A writer
thread would avoid that at the cost of ordering and shutdown care, which
this log does not need.

:class:`AuditRecord` refuses to carry credentials into the log: any value
that looks like a JWT or a ``Bearer`` header value is written as
``[redacted]`` and counted (:attr:`AuditLog.redactions`).
"""

import json
import operator
import os
import time
from json.encoder import c_make_encoder, encode_basestring_ascii

from twisted.application.service import Service
from twisted.logger import Logger

REDACTED = "[redacted]"
#: Destinations other than a file path.
DESTINATIONS = ("stdout", "stderr", "none")
_STANDARD_FDS = {"stdout": 1, "stderr": 2}
_FILE_MODE = 0o640

#: Record fields in serialization order, with their defaults.
_FIELDS = (
    ("time", ""), ("audit_id", ""), ("cluster", ""), ("peer", ""),
    ("issuer", ""), ("subject", ""), ("user", ""), ("groups", ()),
    ("impersonated_user", ""), ("impersonated_groups", ()),
    ("method", ""), ("decision", ""), ("reason", ""),
    ("verb", ""), ("resource", ""), ("namespace", ""), ("name", ""),
    ("subresource", ""), ("api_group", ""), ("upgrade", ""),
    ("status", 0), ("bytes_in", 0), ("bytes_out", 0), ("duration_ms", 0),
)
#: Fields written even when empty; the others are left out when empty.
_DEFAULTS = dict(_FIELDS)
_ALWAYS = frozenset(("time", "audit_id", "decision", "status", "bytes_in", "bytes_out",
                     "duration_ms"))
_NAMES = tuple(name for name, _ in _FIELDS)


def _unserializable(value):
    raise TypeError("Object of type %s is not JSON serializable" % (type(value).__name__,))


if c_make_encoder is not None:
    # What json.dumps(value, separators=(",", ":")) writes, without building
    # an encoder per call (records hold no containers that could nest).
    _c_encode = c_make_encoder(None, _unserializable, encode_basestring_ascii, None, ":", ",",
                               False, False, True)

    def _encode(value):
        return "".join(_c_encode(value, 0))
else:  # pragma: no cover - Pythons without the json accelerator
    _encode = json.JSONEncoder(separators=(",", ":")).encode


_VARIANT = dict(zip("0123456789abcdef", "89ab89ab89ab89ab"))


def _random_hex():
    """32 random hex digits at a time, from one os.urandom call per 256."""
    while True:
        block = os.urandom(16 * 256).hex()
        for i in range(0, len(block), 32):
            yield block[i:i + 32]


_hex = _random_hex()


def _forked():
    global _hex
    _hex = _random_hex()    # a child must not repeat its parent's ids


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def new_audit_id():
    """A fresh random audit id: a version 4 UUID, written as ``str(uuid.uuid4())`` writes it."""
    h = next(_hex)
    return "%s-%s-4%s-%s%s-%s" % (h[:8], h[8:12], h[13:16], _VARIANT[h[16]], h[17:20], h[20:])


_last_second = (None, "")
_MILLISECONDS = tuple(".%03dZ" % (ms,) for ms in range(1000))


def rfc3339(seconds):
    """``seconds`` since the epoch as RFC 3339 UTC with milliseconds."""
    global _last_second
    whole = int(seconds)
    second, text = _last_second
    if second != whole:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _last_second = (whole, text)
    ms = int((seconds - whole) * 1000)
    return text + _MILLISECONDS[ms] if 0 <= ms < 1000 else "%s.%03dZ" % (text, ms)


class AuditRecord:
    """What the guard knows about one request; mutable while it runs.

    ``time`` is when the request started (RFC 3339 UTC; now by default);
    ``user``/``groups`` are the authenticated identity and
    ``impersonated_user``/``impersonated_groups`` what was sent to the API
    server; ``method`` is ``oidc``, ``static`` or ``passthrough``;
    ``decision`` is ``allow`` or ``deny`` (or ``error`` when the guard
    itself failed); ``upgrade`` is ``""``, ``websocket`` or ``spdy``;
    ``status`` is the HTTP status answered.
    Fields are set by keyword or assigned; unknown names raise TypeError.
    """

    __slots__ = tuple(name for name in _NAMES if name != "time") + ("_time", "_started")

    def __init__(self, **values):
        # Every field starts at its default (_FIELDS); ``time`` is formatted
        # only when read, so the guard creates a record per request cheaply.
        self._started = time.time()
        self._time = None
        self.audit_id = self.cluster = self.peer = self.issuer = self.subject = ""
        self.user = self.impersonated_user = self.method = self.decision = self.reason = ""
        self.verb = self.resource = self.namespace = self.name = self.subresource = ""
        self.api_group = self.upgrade = ""
        self.groups = self.impersonated_groups = ()
        self.status = self.bytes_in = self.bytes_out = self.duration_ms = 0
        if values:
            unknown = [name for name in values if name not in _DEFAULTS]
            if unknown:
                raise TypeError("unknown audit record fields: %s"
                                % (", ".join(sorted(unknown)),))
            for name, value in values.items():
                setattr(self, name, value)

    @property
    def time(self):
        if self._time is None:
            self._time = rfc3339(self._started)
        return self._time

    @time.setter
    def time(self, value):
        self._time = value

    def to_json(self):
        """One line of JSON (no newline): fields in a fixed order, empty ones left out."""
        return _serialize(self)[0]


def _token_like(value):
    """True for a JWT-looking value (``eyJ`` then a ``.``) or a ``Bearer`` header value."""
    start = value.find("eyJ")
    return (start >= 0 and value.find(".", start + 3) >= 0) or value[:7].lower() == "bearer "


def _scrub(value):
    """``(value, count)``: ``value`` with token-like strings replaced, and how many."""
    if isinstance(value, str):
        return (REDACTED, 1) if _token_like(value) else (value, 0)
    if isinstance(value, (list, tuple)):
        hits = [isinstance(v, str) and _token_like(v) for v in value]
        return [REDACTED if hit else v for v, hit in zip(value, hits)], sum(hits)
    return value, 0


def _serialize_fields(record, names):
    """``(json members, redactions)`` of ``record``'s fields ``names``: ``"name":value``, ..."""
    out = {}
    redactions = 0
    for name in names:
        value, count = _scrub(getattr(record, name))
        redactions += count
        if value or name in _ALWAYS:
            out[name] = value
    return _encode(out)[1:-1], redactions


def _serialize_all(record):
    """``(line, redactions)`` for ``record``, field by field."""
    members, redactions = _serialize_fields(record, _NAMES)
    return "{" + members + "}", redactions


# The fields from cluster to upgrade say who asked for what, and repeat from
# request to request: their JSON is remembered, keyed by their values (all
# strings, and tuples of strings for the groups), so that only time,
# audit_id and the numbers are encoded for every record.
_MIDDLE = _NAMES[2:20]
_MIDDLE_STRINGS = operator.attrgetter(*(name for name in _MIDDLE if not name.endswith("groups")))
_STR = frozenset((str,))
_SEQUENCES = (list, tuple)
_middles = {}
MIDDLES_SIZE = 1024


def _middle(record):
    """``(json members with a leading comma, redactions)`` of the middle fields, or None."""
    groups, impersonated = record.groups, record.impersonated_groups
    if type(groups) not in _SEQUENCES or type(impersonated) not in _SEQUENCES:
        return None
    try:
        key = (_MIDDLE_STRINGS(record), tuple(groups), tuple(impersonated))
        entry = _middles.get(key)
    except TypeError:       # a value that cannot be a key
        return None
    if entry is None:
        # Only strings are remembered: a key equal to one of these holds the
        # same strings (no value of another built-in type equals a string).
        if not (_STR.issuperset(map(type, key[0])) and _STR.issuperset(map(type, key[1]))
                and _STR.issuperset(map(type, key[2]))):
            return None
        members, redactions = _serialize_fields(record, _MIDDLE)
        entry = ("," + members if members else "", redactions)
        if len(_middles) >= MIDDLES_SIZE:
            _middles.clear()
        _middles[key] = entry
    return entry


def _serialize(record):
    """``(line, redactions)`` for ``record``."""
    start, audit_id = record.time, record.audit_id
    status, bytes_in, bytes_out = record.status, record.bytes_in, record.bytes_out
    duration = record.duration_ms
    middle = None
    if (type(start) is str and type(audit_id) is str and type(status) is int
            and type(bytes_in) is int and type(bytes_out) is int
            and (type(duration) is int or (type(duration) is float and duration - duration == 0))):
        middle = _middle(record)
    if middle is None:
        return _serialize_all(record)
    probe = start + audit_id
    # A token-like value (see _token_like) holds "eyJ" or starts with "bearer ".
    if "eyJ" in probe or "bearer " in probe.lower():
        return _serialize_all(record)
    members, redactions = middle
    return ('{"time":%s,"audit_id":%s%s,"status":%d,"bytes_in":%d,"bytes_out":%d,'
            '"duration_ms":%r}' % (encode_basestring_ascii(start),
                                   encode_basestring_ascii(audit_id), members, status,
                                   bytes_in, bytes_out, duration), redactions)


def _private(path, flags):
    return os.open(path, flags, _FILE_MODE)


class AuditLog(Service):
    """Appends records as JSON lines to ``destination``.

    ``destination`` is ``"stdout"`` or ``"stderr"`` (file descriptor 1 or
    2, bypassing any redirection of ``sys.stdout`` by the logging system),
    ``"none"``, or the absolute path of a file, opened once for appending
    (created with mode 0640) and reopened by :meth:`reopen`.  ``stream``
    replaces the descriptor of ``stdout``/``stderr`` with a binary stream
    (``write`` and ``flush``).  ``reactor`` schedules the batched writes.

    As a service it writes what is queued when it stops.
    """

    log = Logger()

    def __init__(self, destination, *, reactor=None, stream=None):
        if reactor is None:
            from twisted.internet import reactor
        self.destination = destination
        #: How many token-like values were replaced by ``[redacted]``.
        self.redactions = 0
        self._reactor = reactor
        self._pending = []
        self._call = None
        self._path = None
        if destination == "none":
            self._sink = None
        elif destination in _STANDARD_FDS:
            self._sink = stream or open(_STANDARD_FDS[destination], "wb", buffering=0,
                                        closefd=False)
        else:
            self._path = destination
            self._sink = self._open()

    def _open(self):
        return open(self._path, "ab", buffering=0, opener=_private)

    def emit(self, record):
        """Queue ``record`` (an :class:`AuditRecord`); it is written on the next reactor turn."""
        if self._sink is None:
            return
        line, redactions = _serialize(record)
        if redactions:
            self.redactions += redactions
            self.log.warn("audit record held {count} token-like values; they were written as "
                          "[redacted]", count=redactions)
        self._pending.append(line)
        if self._call is None:
            self._call = self._reactor.callLater(0, self.flush)

    def flush(self):
        """Write every queued record now, as one write call."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        data = ("\n".join(lines) + "\n").encode("utf-8")
        try:
            written = self._sink.write(data)
            if written != len(data):
                self._write_rest(memoryview(data), written)
            self._sink.flush()
        except (OSError, ValueError) as e:
            self.log.error("audit log {destination}: {count} records lost: {error}",
                           destination=self.destination, count=len(lines), error=e)

    def _write_rest(self, data, written):
        while True:
            if not written:
                raise BlockingIOError("the destination accepts no more data")
            data = data[written:]
            if not data:
                return
            written = self._sink.write(data)

    def reopen(self):
        """Write what is queued, then reopen the file (after log rotation moved it).

        If the file cannot be reopened, records keep going to the old one.
        A no-op for the other destinations.
        """
        if self._path is None:
            return
        self.flush()
        try:
            sink = self._open()
        except OSError as e:
            self.log.error("audit log {destination}: cannot reopen ({error}); still writing "
                           "to the file opened before", destination=self._path, error=e)
            return
        old, self._sink = self._sink, sink
        old.close()

    def close(self):
        """Write what is queued and close the destination; later records are dropped."""
        self.flush()
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.close()

    def stopService(self):
        self.flush()
        return Service.stopService(self)


def parse_audit(node, *, reactor=None):
    """The optional ``audit:`` section of ``node``: an :class:`AuditLog`.

    ``destination`` is ``stdout`` (the default), ``stderr``, ``none``, or a
    file path (relative to the configuration file) whose directory exists.
    """
    section = node.section("audit")
    destination = section.get("destination", str, "stdout")
    if destination not in DESTINATIONS:
        destination = section.path("destination", must_exist=False)
        directory = os.path.dirname(destination)
        if os.path.isdir(destination):
            raise section.error("destination", "%s is a directory: name a file in it, such as "
                                               "%s" % (destination,
                                                       os.path.join(destination, "audit.jsonl")))
        if not os.path.isdir(directory):
            raise section.error("destination", "directory %s does not exist: create it, or "
                                               "choose stdout, stderr or none" % (directory,))
    section.finish()
    try:
        return AuditLog(destination, reactor=reactor)
    except OSError as e:
        raise section.error("destination", "cannot open %s for appending: %s"
                            % (destination, e.strerror)) from None

"""Tests for arc.guard.audit: record shape, redaction, destinations, batching."""

import json
import os
import random
import stat

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from arc.config import Node
from arc.errors import ConfigError
from arc.guard import audit
from arc.guard.audit import _FIELDS, REDACTED, AuditLog, AuditRecord, _scrub, parse_audit, rfc3339

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"

FULL_ORDER = ["time", "audit_id", "cluster", "peer", "issuer", "subject", "user", "groups",
              "impersonated_user", "impersonated_groups", "method", "decision", "reason",
              "verb", "resource", "namespace", "name", "subresource", "api_group", "upgrade",
              "status", "bytes_in", "bytes_out", "duration_ms"]


def full_record():
    return AuditRecord(
        time="2024-05-01T12:00:00.250Z", audit_id="a1", cluster="prod", peer="10.0.0.7:5123",
        issuer="https://login.example/", subject="sub-1", user="alice@example.com",
        groups=["dev", "ops"], impersonated_user="alice@example.com",
        impersonated_groups=("dev",), method="oidc", decision="allow", reason="ok",
        verb="create", resource="pods", namespace="dev", name="web", subresource="exec",
        api_group="", upgrade="websocket", status=101, bytes_in=120, bytes_out=4096,
        duration_ms=12.5)


class FakeStream:
    """A binary stream recording each write call."""

    def __init__(self, fail=0):
        self.writes = []
        self.fail = fail

    def write(self, data):
        if self.fail:
            self.fail -= 1
            raise OSError(32, "Broken pipe")
        self.writes.append(bytes(data))
        return len(data)

    def flush(self):
        pass

    def lines(self):
        return [json.loads(line) for line in b"".join(self.writes).decode().splitlines()]


class RecordTests(unittest.TestCase):
    def test_key_order_and_values(self):
        line = full_record().to_json()
        self.assertNotIn("\n", line)
        data = json.loads(line)
        self.assertEqual(list(data), [k for k in FULL_ORDER if k != "api_group"])
        self.assertEqual(data["groups"], ["dev", "ops"])
        self.assertEqual(data["impersonated_groups"], ["dev"])
        self.assertEqual((data["status"], data["bytes_out"], data["duration_ms"]),
                         (101, 4096, 12.5))

    def test_empty_optional_fields_are_left_out(self):
        record = AuditRecord(time="2024-05-01T12:00:00.000Z", audit_id="a2", decision="deny")
        self.assertEqual(record.to_json(),
                         '{"time":"2024-05-01T12:00:00.000Z","audit_id":"a2","decision":"deny",'
                         '"status":0,"bytes_in":0,"bytes_out":0,"duration_ms":0}')

    def test_assigned_fields_and_one_line(self):
        record = AuditRecord()
        record.reason = "line one\nline two"
        record.groups = ["a"]
        data = json.loads(record.to_json())
        self.assertEqual((data["reason"], data["groups"]), ("line one\nline two", ["a"]))
        self.assertNotIn("\n", record.to_json())

    def test_time_defaults_to_now(self):
        self.assertRegex(AuditRecord().time, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(rfc3339(1714564800.25), "2024-05-01T12:00:00.250Z")
        self.assertEqual(rfc3339(0), "1970-01-01T00:00:00.000Z")

    def test_unknown_field(self):
        self.assertRaises(TypeError, AuditRecord, token="x")
        self.assertRaises(AttributeError, setattr, AuditRecord(), "token", "x")


class RedactionTests(unittest.TestCase):
    def test_token_like_values_are_never_written(self):
        record = full_record()
        record.subject = JWT
        record.reason = "token was " + JWT
        record.user = "Bearer abc.def"
        record.groups = ["dev", "bearer xyz"]
        line = record.to_json()
        for secret in (JWT, "abc.def", "xyz"):
            self.assertNotIn(secret, line)
        data = json.loads(line)
        self.assertEqual((data["subject"], data["reason"], data["user"]),
                         (REDACTED, REDACTED, REDACTED))
        self.assertEqual(data["groups"], ["dev", REDACTED])

    def test_ordinary_values_are_kept(self):
        record = full_record()
        for value in ("eyJ-without-a-dot", "a.b then eyJ", "no bearer token in the request",
                      "Bearer", "system:serviceaccount:dev:eyJ"):
            record.reason = value
            self.assertEqual(json.loads(record.to_json())["reason"], value)

    def test_log_counts_redactions(self):
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        stream = FakeStream()
        log = AuditLog("stdout", reactor=Clock(), stream=stream)
        record = full_record()
        record.subject = JWT
        record.impersonated_groups = ["Bearer " + JWT]
        log.emit(record)
        log.emit(full_record())
        self.assertEqual(log.redactions, 2)
        self.assertEqual([e["count"] for e in events if "count" in e], [2])
        self.assertFalse(any(JWT in repr(e) for e in events))
        log.flush()
        self.assertNotIn(JWT.encode(), b"".join(stream.writes))


class BatchingTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.stream = FakeStream()
        self.log = AuditLog("stdout", reactor=self.clock, stream=self.stream)

    def test_one_write_per_reactor_turn(self):
        for i in range(3):
            self.log.emit(AuditRecord(audit_id="r%d" % i))
        self.assertEqual(self.stream.writes, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.stream.writes), 1)
        self.assertTrue(self.stream.writes[0].endswith(b"\n"))
        self.assertEqual([r["audit_id"] for r in self.stream.lines()], ["r0", "r1", "r2"])
        self.log.emit(AuditRecord(audit_id="r3"))
        self.clock.advance(0)
        self.assertEqual(len(self.stream.writes), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_now_cancels_the_scheduled_write(self):
        self.log.emit(AuditRecord(audit_id="r0"))
        self.log.flush()
        self.assertEqual(len(self.stream.writes), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopping_the_service_writes_the_queue(self):
        self.log.startService()
        self.log.emit(AuditRecord(audit_id="r0"))
        self.log.stopService()
        self.assertEqual([r["audit_id"] for r in self.stream.lines()], ["r0"])

    def test_short_writes_are_completed(self):
        chunks = []

        class Trickle(FakeStream):
            def write(self, data):
                chunks.append(bytes(data[:7]))
                return min(7, len(data))

        log = AuditLog("stderr", reactor=self.clock, stream=Trickle())
        log.emit(AuditRecord(audit_id="r0"))
        log.flush()
        self.assertEqual(json.loads(b"".join(chunks))["audit_id"], "r0")

    def test_a_failed_write_is_logged_and_later_batches_go_out(self):
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.stream.fail = 1
        self.log.emit(AuditRecord(audit_id="lost"))
        self.clock.advance(0)
        self.assertEqual([e["count"] for e in events if "count" in e], [1])
        self.log.emit(AuditRecord(audit_id="kept"))
        self.clock.advance(0)
        self.assertEqual([r["audit_id"] for r in self.stream.lines()], ["kept"])


class DestinationTests(unittest.TestCase):
    def path(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        return os.path.join(directory, "audit.jsonl")

    def read(self, path):
        with open(path) as f:
            return [json.loads(line)["audit_id"] for line in f]

    def test_file_is_appended_to(self):
        path = self.path()
        with open(path, "w") as f:
            f.write('{"audit_id":"old"}\n')
        clock = Clock()
        log = AuditLog(path, reactor=clock)
        self.addCleanup(log.close)
        log.emit(AuditRecord(audit_id="a"))
        log.emit(AuditRecord(audit_id="b"))
        self.assertEqual(self.read(path), ["old"])
        clock.advance(0)
        self.assertEqual(self.read(path), ["old", "a", "b"])

    def test_new_file_is_not_world_readable(self):
        path = self.path()
        AuditLog(path, reactor=Clock()).close()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode) & 0o007, 0)

    def test_reopen_after_rotation(self):
        path = self.path()
        clock = Clock()
        log = AuditLog(path, reactor=clock)
        self.addCleanup(log.close)
        log.emit(AuditRecord(audit_id="before"))
        clock.advance(0)
        os.rename(path, path + ".1")
        log.emit(AuditRecord(audit_id="queued"))
        log.reopen()
        log.emit(AuditRecord(audit_id="after"))
        clock.advance(0)
        self.assertEqual(self.read(path + ".1"), ["before", "queued"])
        self.assertEqual(self.read(path), ["after"])

    def test_failed_reopen_keeps_the_old_file(self):
        path = self.path()
        clock = Clock()
        log = AuditLog(path, reactor=clock)
        self.addCleanup(log.close)
        os.rename(path, path + ".1")

        def refuse():
            raise PermissionError(13, "Permission denied")

        self.patch(log, "_open", refuse)
        log.reopen()
        log.emit(AuditRecord(audit_id="still"))
        clock.advance(0)
        self.assertEqual(self.read(path + ".1"), ["still"])

    def test_none_writes_nothing(self):
        clock = Clock()
        log = AuditLog("none", reactor=clock)
        log.emit(full_record())
        log.reopen()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stderr_writes_to_the_descriptor(self):
        path = self.path()
        saved = os.dup(2)
        try:
            with open(path, "wb") as target:
                os.dup2(target.fileno(), 2)
            log = AuditLog("stderr", reactor=Clock())
            log.emit(AuditRecord(audit_id="fd2"))
            log.close()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        self.assertEqual(self.read(path), ["fd2"])


class ParseTests(unittest.TestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.file = os.path.join(self.base, "guard.yaml")

    def parse(self, audit):
        log = parse_audit(Node({"audit": audit}, self.file), reactor=Clock())
        self.addCleanup(log.close)
        return log

    def assertConfigError(self, audit, reason):
        with self.assertRaises(ConfigError) as caught:
            self.parse(audit)
        self.assertEqual((caught.exception.file, caught.exception.key),
                         (self.file, "audit.destination"))
        self.assertIn(reason, caught.exception.reason)

    def test_default_is_stdout(self):
        log = parse_audit(Node({}, self.file), reactor=Clock())
        self.assertEqual(log.destination, "stdout")

    def test_named_destinations(self):
        for name in ("stdout", "stderr", "none"):
            self.assertEqual(self.parse({"destination": name}).destination, name)

    def test_relative_path_is_relative_to_the_config_file(self):
        os.makedirs(os.path.join(self.base, "logs"))
        log = self.parse({"destination": "logs/audit.jsonl"})
        self.assertEqual(log.destination, os.path.join(self.base, "logs", "audit.jsonl"))
        self.assertTrue(os.path.exists(log.destination))

    def test_missing_directory(self):
        self.assertConfigError({"destination": "nowhere/audit.jsonl"},
                               "directory %s does not exist" % os.path.join(self.base, "nowhere"))

    def test_directory_is_not_a_file(self):
        self.assertConfigError({"destination": "."}, "is a directory")

    def test_wrong_type(self):
        self.assertConfigError({"destination": 3}, "must be a string")

    def test_unknown_key(self):
        with self.assertRaises(ConfigError) as caught:
            self.parse({"destination": "none", "format": "json"})
        self.assertEqual(caught.exception.key, "audit.format")



def reference_line(record):
    """A record's line as the audit log defines it, field by field (see AuditRecord)."""
    out = {}
    for name, _ in _FIELDS:
        value, _ = _scrub(getattr(record, name))
        if value or name in ("time", "audit_id", "decision", "status", "bytes_in",
                             "bytes_out", "duration_ms"):
            out[name] = value
    return json.dumps(out, separators=(",", ":"))


class SerializationTests(unittest.TestCase):
    """Lines written from remembered fragments equal lines written field by field."""

    VALUES = {
        "str": ["", "demo", "stream 7", "a\"b\\c", "caf\xe9 \u2603", "line\nbreak", JWT,
                "Bearer x", "bearer", "eyJ", "system:masters"],
        "groups": [(), [], ["dev"], ("dev", "ops"), ["Bearer " + JWT], [""], ["a", 1]],
        "number": [0, 1, 200, 10 ** 20, 0.0, 0.073, 12.5, -0.0, True, float("inf"), "7"],
    }

    def random_record(self, rng):
        record = AuditRecord()
        for name, default in _FIELDS:
            if rng.random() < 0.4:
                continue
            kind = ("groups" if name.endswith("groups") else
                    "number" if not isinstance(default, str) else "str")
            if kind == "str" and rng.random() < 0.05:
                kind = rng.choice(["number", "groups"])
            setattr(record, name, rng.choice(self.VALUES[kind]))
        return record

    def test_lines_match_the_field_by_field_reading(self):
        rng = random.Random(7)
        audit._middles.clear()
        for _ in range(5000):
            record = self.random_record(rng)
            line, redactions = audit._serialize(record)
            self.assertEqual(line, reference_line(record))
            self.assertEqual(redactions, sum(_scrub(getattr(record, name))[1]
                                             for name in FULL_ORDER))
        self.assertTrue(audit._middles, "fragments were remembered")

    def test_remembered_fragments_stay_bounded(self):
        for i in range(audit.MIDDLES_SIZE * 3):
            AuditRecord(peer="10.0.0.%d:%d" % (i % 250, i)).to_json()
        self.assertLessEqual(len(audit._middles), audit.MIDDLES_SIZE)

"""arc.guard.http1: heads read the fast way answer exactly as heads read line by line."""

import random

from twisted.trial import unittest

from arc.guard import http1
from arc.guard.headers import WS_BEARER_PREFIX, clean, clean_head
from arc.guard.http1 import MAX_HEADERS, HTTPError, parse_head

# Header lines of every shape: canonical ones, and each way a line can miss
# being canonical (spacing, empty values, control and non-ASCII characters,
# bare CR or LF, malformed names), for the headers the guard acts on and others.
LINES = [
    "Host: 127.0.0.1:6443", "User-Agent: kubectl/v1.33.1 (linux/amd64) kubernetes/8adc0f0",
    "Accept: application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    "Accept-Encoding: gzip", "Kubectl-Command: kubectl get", "X-Empty:", "X-Empty: ",
    "X-Spaces:   padded   ", "X-Tight:value", "X-Tab: a\tb", "X-Tab-Start: \ta", "X-Tab-End: a\t",
    "X-Latin: caf\xe9", "X-Nbsp: a\xa0", "X-Nel: \x85a", "X-Ctl: a\x0bb", "X-Bare-Lf: a\nb",
    "X-Bare-Cr: a\rb", "X-Colons: a: b: c", "X-Colon-Blank: a:  b",
    " Leading: space", "Trailing : space", "In ner: space", ": no name", "no colon",
    "Content-Length: 5", "content-length: 5", "Content-Length: 07", "Content-Length: x",
    "Transfer-Encoding: chunked", "transfer-encoding: gzip, chunked", "Connection: close",
    "Connection: keep-alive, Upgrade", "connection: Close", "Upgrade: websocket",
    "Upgrade: SPDY/3.1", "Authorization: Bearer alice-token", "authorization: bearer  tok ",
    "AUTHORIZATION: Bearer a b", "Authorization: Basic YTpi", "Authorization: Bearer",
    "Authorization-Extra: x", "Impersonate-User: root", "impersonate-group: admins",
    "X-Impersonate-User: not-special", "X-Remote-User: root", "x-forwarded-for: 1.2.3.4",
    "Audit-ID: chosen", "Audit-Id: 3c1e8f0a", "Proxy-Authorization: Basic x",
    "Sec-WebSocket-Protocol: v5.channel.k8s.io",
    "Sec-WebSocket-Protocol: v5.channel.k8s.io, " + WS_BEARER_PREFIX + "d3MtdG9rZW4",
    "X-Stream-Protocol-Version: v4.channel.k8s.io", "Date: Wed, 01 May 2024 12:00:00 GMT",
]
NAMES = ["host", "Content-Length", "transfer-encoding", "connection", "CONNECTION", "upgrade",
         "audit-id", "authorization", "x-empty", "x-tab", "x-latin", "x-bare-lf", "missing"]


def reference_parse_head(raw, request=True):
    """The line-by-line reading every head gets when it is not canonical."""
    text = raw[:-4].decode("latin-1")
    if "\n" in text.replace("\r\n", "") or "\r" in text.replace("\r\n", ""):
        if request:
            raise HTTPError(400, "bare CR or LF in the request head (lines must end in CRLF)")
        raise HTTPError(502, "bare CR or LF in the head from the API server")
    lines = text.split("\r\n")
    start = lines[0].split(" ", 2)
    if request:
        if len(start) != 3 or not start[2].startswith("HTTP/1."):
            raise HTTPError(400, "malformed request line")
    elif len(start) < 2 or not start[0].startswith("HTTP/1.") or not start[1].isdigit():
        raise HTTPError(502, "malformed status line from the API server")
    if len(start) == 2:
        start.append("")
    if len(lines) - 1 > MAX_HEADERS:
        raise HTTPError(431, "more than %d header lines" % MAX_HEADERS)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise HTTPError(400, "malformed header line")
        headers.append([name, value.strip()])
    return http1.Head(tuple(start), headers)


def outcome(function, *args):
    try:
        return "ok", function(*args)
    except HTTPError as e:
        return "error", (e.status, e.message)


def heads(seed, count):
    rng = random.Random(seed)
    for _ in range(count):
        lines = [rng.choice(LINES) for _ in range(rng.randrange(0, 9))]
        yield ("GET /api/v1/pods?limit=500 HTTP/1.1" + "".join("\r\n" + line for line in lines)
               + "\r\n\r\n").encode("latin-1")


class ParseTests(unittest.TestCase):
    def assertSameHead(self, raw, request=True):
        fast = outcome(parse_head, raw, request)
        slow = outcome(reference_parse_head, raw, request)
        self.assertEqual(fast[0], slow[0], raw)
        if fast[0] == "error":
            self.assertEqual(fast[1], slow[1], raw)
            return None
        fast, slow = fast[1], slow[1]
        self.assertEqual(fast.start, slow.start, raw)
        self.assertEqual(fast.headers, slow.headers, raw)
        for name in NAMES:
            self.assertEqual(fast.get(name), slow.get(name), (raw, name))
            self.assertEqual(fast.get_all(name), slow.get_all(name), (raw, name))
            self.assertEqual(fast.tokens(name), slow.tokens(name), (raw, name))
        self.assertEqual(fast.serialize(), slow.serialize(), raw)
        self.assertEqual(outcome(http1.request_framing, fast),
                         outcome(http1.request_framing, slow), raw)
        return fast

    def test_random_heads_read_alike(self):
        canonical = 0
        for raw in heads(1, 3000):
            head = self.assertSameHead(raw)
            canonical += head is not None and head.text is not None
        self.assertGreater(canonical, 100, "the fast reading was tried")

    def test_kubectl_head_is_canonical(self):
        raw = ("GET /api/v1/namespaces/default/pods?limit=500 HTTP/1.1\r\n" + "\r\n".join(
            LINES[:5] + ["Authorization: Bearer t"]) + "\r\n\r\n").encode()
        self.assertIsNotNone(self.assertSameHead(raw).text)

    def test_responses_read_alike(self):
        for status_line in ("HTTP/1.1 200 OK", "HTTP/1.1 101 Switching Protocols",
                            "HTTP/1.1 204", "HTTP/1.0 200 OK", "HTTP/1.1 abc OK", "HTTP/2 200"):
            for raw in heads(2, 200):
                raw = status_line.encode() + raw[raw.index(b"\r\n"):]
                self.assertSameHead(raw, request=False)

    def test_header_count_limit(self):
        for count in (MAX_HEADERS - 1, MAX_HEADERS, MAX_HEADERS + 1):
            for line in ("X-A: b", "X-A:b"):
                raw = ("GET / HTTP/1.1" + ("\r\n" + line) * count + "\r\n\r\n").encode()
                self.assertSameHead(raw)

    def test_no_headers_and_bad_request_lines(self):
        for raw in (b"GET / HTTP/1.1\r\n\r\n", b"GET /\r\n\r\n", b"GET / HTTP/2\r\nA: b\r\n\r\n",
                    b"GET  / HTTP/1.1\r\nA: b\r\n\r\n", b"\r\n\r\n"):
            self.assertSameHead(raw)

    def test_long_blank_runs_stay_cheap(self):
        # Lines the fast reading refuses after a long run: it must not backtrack badly.
        for block in ("\r\nX: " + "a " * 30000 + " ", "\r\nX: a" + "\t" * 60000 + "\x01",
                      "\r\nX: " + " " * 60000 + "a", "\r\n" + "a" * 60000):
            raw = ("GET / HTTP/1.1" + block + "\r\n\r\n").encode("latin-1")
            self.assertSameHead(raw)


class CleanTests(unittest.TestCase):
    def test_clean_head_is_clean(self):
        seen_fast = 0
        for raw in heads(3, 3000):
            try:
                head = parse_head(raw)
            except HTTPError:
                continue
            for allow in (False, True):
                fast = outcome(clean_head, head, allow)
                slow = outcome(clean, reference_parse_head(raw).headers, allow)
                self.assertEqual(fast[0], slow[0], raw)
                if fast[0] == "error":
                    self.assertEqual(fast[1], slow[1], raw)
                    continue
                fast, slow = fast[1], slow[1]
                seen_fast += fast.headers is None
                self.assertEqual((fast.bearer, fast.impersonation, fast.upgrade),
                                 (slow.bearer, slow.impersonation, slow.upgrade), raw)
                self.assertEqual(fast.header_text(), slow.header_text(), raw)
        self.assertGreater(seen_fast, 10, "the fast cleaning was tried")


class ChunkedTests(unittest.TestCase):
    """A chunked body ends where it ends, however its bytes are split."""

    BODY = (b"5\r\nhello\r\n1a;ext=1\r\n" + b"x" * 26 + b"\r\n3\nabc  \n0\r\n"
            b"Trailer: t\r\n\r\n")

    def test_every_split(self):
        for cut in range(len(self.BODY) + 1):
            for rest in (b"", b"GET / HTTP/1.1\r\n"):
                tracker = http1.BodyTracker(http1.CHUNKED)
                data = self.BODY + rest
                first = tracker.feed(data[:cut], 0)
                self.assertEqual(first, cut if cut < len(self.BODY) else len(self.BODY))
                if not tracker.done:
                    end = tracker.feed(data[cut:], 0)
                    self.assertEqual(cut + end, len(self.BODY), cut)
                self.assertTrue(tracker.done, cut)

    def test_missing_crlf_after_data(self):
        tracker = http1.BodyTracker(http1.CHUNKED)
        self.assertRaises(HTTPError, tracker.feed, b"3\r\nabcX\r\n0\r\n\r\n", 0)

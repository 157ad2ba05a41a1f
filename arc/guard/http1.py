"""The little of HTTP/1.1 the guard needs, sans-I/O.

The guard must see every request head (to authenticate it and rewrite its
identity headers) but must not re-frame bodies: they pass through as bytes,
and only their *end* is tracked so that the next request on a keep-alive
connection is found.  A general-purpose parser (h11 and the like) decodes
and re-encodes every body chunk; here a body costs a counter per read.
"""

import re

MAX_HEAD = 64 * 1024
MAX_HEADERS = 200


class HTTPError(Exception):
    """A request the guard refuses before forwarding; ``status`` for the answer."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Head:
    """A parsed message head; ``headers`` keep order, case and repeats.

    Most heads are *canonical*: every header line is ``Name: value`` with a
    token name, one space, and a value that neither starts nor ends with
    whitespace.  Such a head keeps its header block as text
    (``text``, each line preceded by CRLF) and answers lookups by searching
    it; the ``headers`` list is built only when asked for.  Any other head is
    parsed line by line and looked up through an index.  Both give the same
    answers.
    """

    __slots__ = ("start", "_headers", "_index", "text", "lower")

    def __init__(self, start, headers, text=None):
        self.start = start          # (method, target, version) or (version, status, reason)
        self._headers = headers     # list of [name, value] (str, latin-1), or None
        self._index = None
        self.text = text            # the header block of a canonical head, else None
        self.lower = text.lower() if text is not None else None     # for lookups

    @property
    def headers(self):
        if self._headers is None:
            self._headers = [line.split(": ", 1) for line in self.text.split("\r\n")[1:]]
        return self._headers

    def _lookup(self):
        # Built once per head: several lookups per message are the rule.
        index = {}
        for key, value in self.headers:
            index.setdefault(key.lower(), []).append(value)
        self._index = index
        return index

    def set_headers(self, headers):
        self._headers = headers
        self._index = None
        self.text = self.lower = None

    def get(self, name):
        if self.text is not None:
            key = _KEYS.get(name) or _key(name)
            i = self.lower.find(key)
            if i < 0:
                return None
            i += len(key)
            end = self.text.find("\r\n", i)
            return self.text[i:end] if end >= 0 else self.text[i:]
        values = (self._index or self._lookup()).get(name.lower())
        return values[0] if values else None

    def get_all(self, name):
        if self.text is not None:
            key = _KEYS.get(name) or _key(name)
            i = self.lower.find(key)
            if i < 0:
                return []
            out = []
            text, lower = self.text, self.lower
            while i >= 0:
                i += len(key)
                end = text.find("\r\n", i)
                if end < 0:
                    out.append(text[i:])
                    break
                out.append(text[i:end])
                i = lower.find(key, end)
            return out
        return list((self._index or self._lookup()).get(name.lower(), ()))

    def has(self, name):
        """True if the head has header ``name``."""
        if self.text is not None:
            return (_KEYS.get(name) or _key(name)) in self.lower
        return name.lower() in (self._index or self._lookup())

    def tokens(self, name):
        if self.text is not None and (_KEYS.get(name) or _key(name)) not in self.lower:
            return []
        out = []
        for value in self.get_all(name):
            out.extend(t.strip().lower() for t in value.split(",") if t.strip())
        return out

    def header_text(self):
        """The header lines as sent on, each preceded by CRLF."""
        if self.text is not None:
            return self.text
        return "".join(["\r\n%s: %s" % (k, v) for k, v in self.headers])

    def serialize(self):
        return (" ".join(self.start) + self.header_text() + "\r\n\r\n").encode("latin-1")


_KEYS = {}


def _key(name):
    """What starts the line of header ``name`` in the lower-cased text of a canonical head."""
    key = "\r\n%s: " % (name.lower(),)
    if len(_KEYS) < 256:
        _KEYS[name] = key
    return key


def split_head(buf, max_head=MAX_HEAD):
    """Index just past the end of the head in ``buf``, or -1 while incomplete."""
    end = buf.find(b"\r\n\r\n", 0, max_head + 4)
    if end < 0:
        if len(buf) > max_head:
            raise HTTPError(431, "request head larger than %d bytes" % max_head)
        return -1
    return end + 4


# A canonical header block (see Head): at most MAX_HEADERS lines of a token
# name, ": " and a value that neither starts nor ends with whitespace and
# holds no CR.  Read line by line, such a block gives the same names and values.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_CANONICAL = re.compile(r"(?:\r\n%s: \S[^\r]*(?<!\s)){0,%d}" % (_TOKEN, MAX_HEADERS))


def parse_head(raw, request=True):
    """Parse a complete head (ending in CRLF CRLF)."""
    try:
        text = raw[:-4].decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HTTPError(400, "undecodable head")
    lines = text.count("\r\n")
    if text.count("\n") != lines or text.count("\r") != lines:
        # A lone LF ends a line for Go's parser but not for ours: a value
        # holding one could smuggle a header (Impersonate-User...) past the
        # checks, so such heads are refused outright.
        if request:
            raise HTTPError(400, "bare CR or LF in the request head (lines must end in CRLF)")
        raise HTTPError(502, "bare CR or LF in the head from the API server")
    first = text.find("\r\n")
    block = text[first:] if first >= 0 else ""
    start = (text[:first] if first >= 0 else text).split(" ", 2)
    if request:
        if len(start) != 3 or not start[2].startswith("HTTP/1."):
            raise HTTPError(400, "malformed request line")
    elif len(start) < 2 or not start[0].startswith("HTTP/1.") or not start[1].isdigit():
        raise HTTPError(502, "malformed status line from the API server")
    if len(start) == 2:
        start.append("")
    if _CANONICAL.fullmatch(block):
        return Head(tuple(start), None, block)
    if block.count("\r\n") > MAX_HEADERS:
        raise HTTPError(431, "more than %d header lines" % MAX_HEADERS)
    headers = []
    for line in block.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise HTTPError(400, "malformed header line")
        headers.append([name, value.strip()])
    return Head(tuple(start), headers)


# -- body framing ---------------------------------------------------------------

NONE, LENGTH, CHUNKED, UNTIL_CLOSE = "none", "length", "chunked", "close"


def request_framing(head):
    """How the request body is delimited: ``(kind, length)``."""
    if not head.has("transfer-encoding") and not head.has("content-length"):
        return NONE, 0
    te = head.tokens("transfer-encoding")
    lengths = head.get_all("content-length")
    if te:
        if lengths:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length: refused "
                                 "(request smuggling)")
        if te != ["chunked"]:
            raise HTTPError(501, "unsupported Transfer-Encoding %s" % ", ".join(te))
        return CHUNKED, 0
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            raise HTTPError(400, "invalid Content-Length")
        n = int(lengths[0])
        return (LENGTH, n) if n else (NONE, 0)
    return NONE, 0


def response_framing(head, request_method):
    """How the response body is delimited, given the request's method."""
    status = int(head.start[1])
    if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return NONE, 0
    te = head.tokens("transfer-encoding")
    if te:
        return (CHUNKED, 0) if te[-1] == "chunked" else (UNTIL_CLOSE, 0)
    length = head.get("content-length")
    if length is not None and length.isdigit():
        n = int(length)
        return (LENGTH, n) if n else (NONE, 0)
    return UNTIL_CLOSE, 0


def body_tracker(kind, length=0):
    """A :class:`BodyTracker` for a body of ``kind`` (a shared one when there is no body)."""
    return NO_BODY if kind == NONE else BodyTracker(kind, length)


class BodyTracker:
    """Finds where a body ends in a byte stream, without copying it.

    ``feed(buf, start)`` returns the index in ``buf`` just past the body's
    last byte seen so far; ``done`` turns true at the body's end.
    """

    __slots__ = ("kind", "remaining", "done", "_state", "_line")

    def __init__(self, kind, length=0):
        self.kind = kind
        self.remaining = length
        self.done = kind == NONE
        self._state = "size"
        self._line = b""

    def feed(self, buf, start=0):
        if self.done:
            return start
        if self.kind == LENGTH:
            take = min(self.remaining, len(buf) - start)
            self.remaining -= take
            if not self.remaining:
                self.done = True
            return start + take
        if self.kind == UNTIL_CLOSE:
            return len(buf)
        return self._chunked(buf, start)

    def _chunked(self, buf, i):
        n = len(buf)
        while i < n and not self.done:
            state = self._state
            if state == "data":
                take = min(self.remaining, n - i)
                i += take
                self.remaining -= take
                if not self.remaining:
                    if buf[i:i + 2] == b"\r\n":     # the CRLF after the data, as a rule
                        i += 2
                        self._state = "size"
                    else:
                        self._state = "data-crlf"
                        self._line = b""
                continue
            end = buf.find(b"\n", i)
            if end < 0:
                self._line += bytes(buf[i:])
                if len(self._line) > 4096:
                    raise HTTPError(400, "chunk header line too long")
                return n
            line = self._line + bytes(buf[i:end])
            self._line = b""
            i = end + 1
            if state == "size":
                size = line.split(b";", 1)[0].strip()
                try:
                    self.remaining = int(size, 16)
                except ValueError:
                    raise HTTPError(400, "invalid chunk size")
                if self.remaining < 0:
                    raise HTTPError(400, "invalid chunk size")
                self._state = "data" if self.remaining else "trailer"
            elif state == "data-crlf":
                if line.strip():
                    raise HTTPError(400, "missing CRLF after chunk data")
                self._state = "size"
            elif not line.strip():      # trailer: an empty line ends the body
                self.done = True
        return i


#: The tracker of every message without a body: done from the start, it never changes.
NO_BODY = BodyTracker(NONE)

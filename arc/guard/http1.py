"""The little of HTTP/1.1 the guard needs, sans-I/O.

The guard must see every request head (to authenticate it and rewrite its
identity headers) but must not re-frame bodies: they pass through as bytes,
and only their *end* is tracked so that the next request on a keep-alive
connection is found.  A general-purpose parser (h11 and the like) decodes
and re-encodes every body chunk; here a body costs a counter per read.
"""

MAX_HEAD = 64 * 1024
MAX_HEADERS = 200


class HTTPError(Exception):
    """A request the guard refuses before forwarding; ``status`` for the answer."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Head:
    """A parsed message head; ``headers`` keep order, case and repeats."""

    __slots__ = ("start", "headers", "_index")

    def __init__(self, start, headers):
        self.start = start          # (method, target, version) or (version, status, reason)
        self.headers = headers      # list of [name, value] (str, latin-1)
        self._index = None

    def _lookup(self):
        # Built once per head: several lookups per message are the rule.
        index = {}
        for key, value in self.headers:
            index.setdefault(key.lower(), []).append(value)
        self._index = index
        return index

    def set_headers(self, headers):
        self.headers = headers
        self._index = None

    def get(self, name):
        values = (self._index or self._lookup()).get(name.lower())
        return values[0] if values else None

    def get_all(self, name):
        return list((self._index or self._lookup()).get(name.lower(), ()))

    def tokens(self, name):
        out = []
        for value in self.get_all(name):
            out.extend(t.strip().lower() for t in value.split(",") if t.strip())
        return out

    def serialize(self):
        lines = [" ".join(self.start)]
        lines.extend("%s: %s" % (k, v) for k, v in self.headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def split_head(buf, max_head=MAX_HEAD):
    """Index just past the end of the head in ``buf``, or -1 while incomplete."""
    end = buf.find(b"\r\n\r\n", 0, max_head + 4)
    if end < 0:
        if len(buf) > max_head:
            raise HTTPError(431, "request head larger than %d bytes" % max_head)
        return -1
    return end + 4


def parse_head(raw, request=True):
    """Parse a complete head (ending in CRLF CRLF)."""
    try:
        text = raw[:-4].decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HTTPError(400, "undecodable head")
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
    return Head(tuple(start), headers)


# -- body framing ---------------------------------------------------------------

NONE, LENGTH, CHUNKED, UNTIL_CLOSE = "none", "length", "chunked", "close"


def request_framing(head):
    """How the request body is delimited: ``(kind, length)``."""
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

"""SPDY/3.1 frames, sans-I/O: what kubectl's exec, attach and port-forward speak.

kubectl's upgraded SPDY connections (and the SPDY inside the WebSocket of
``SPDY/3.1+portforward.k8s.io``) carry one SPDY stream per channel.  This
module turns bytes into frame objects (L{FrameDecoder}) and frame objects
into bytes (L{FrameEncoder}); it knows nothing of streams' meaning.

Every frame starts with 8 bytes.  A control frame has the high bit set, the
version (3) and a type, then 8 bits of flags and a 24-bit length; a data
frame has a 31-bit stream id where the version and type would be.  Header
blocks (in SYN_STREAM, SYN_REPLY and HEADERS) are a count and
length-prefixed names and values, compressed with zlib primed with
L{DICTIONARY}; each direction of a connection keeps one zlib context for
all its header blocks, flushed (not finished) after each block.  So the
encoder and the decoder of one connection are separate objects, each fed
every frame of its direction in order.
"""

import struct
import zlib
from dataclasses import dataclass

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
STREAM_ALREADY_CLOSED = 9

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1

MAX_LENGTH = 0xFFFFFF
MAX_STREAM_ID = 0x7FFFFFFF
HEADER_BLOCK_LIMIT = 256 * 1024

_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding "
    "accept-language accept-ranges age allow authorization cache-control connection "
    "content-base content-encoding content-language content-length content-location "
    "content-md5 content-range content-type date etag expect expires from host "
    "if-match if-modified-since if-none-match if-range if-unmodified-since "
    "last-modified location max-forwards pragma proxy-authenticate "
    "proxy-authorization range referer retry-after server te trailer "
    "transfer-encoding upgrade user-agent vary via warning www-authenticate method "
    "get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]

_TEXT = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
    "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
    "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
    "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
    "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,"
    "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)

DICTIONARY = b"".join(struct.pack("!I", len(w)) + w.encode("ascii") for w in _WORDS) + (
    _TEXT.encode("ascii")
)
"""The zlib dictionary of SPDY/3 header blocks (section 2.6.10.1 of the draft):
length-prefixed common header names and values, then status codes, reason
phrases, dates and media types as plain text; 1423 bytes."""


class ProtocolError(Exception):
    """Bytes that are not SPDY/3 frames: the connection cannot go on."""


@dataclass(frozen=True)
class DataFrame:
    streamId: int
    data: bytes = b""
    fin: bool = False


@dataclass(frozen=True)
class SynStream:
    """A new stream; C{headers} is a tuple of C{(name, value)} pairs."""

    streamId: int
    headers: tuple = ()
    associatedTo: int = 0
    priority: int = 0
    slot: int = 0
    fin: bool = False
    unidirectional: bool = False


@dataclass(frozen=True)
class SynReply:
    streamId: int
    headers: tuple = ()
    fin: bool = False


@dataclass(frozen=True)
class RstStream:
    streamId: int
    status: int


@dataclass(frozen=True)
class Settings:
    """C{entries} is a tuple of C{(flags, id, value)} triples."""

    entries: tuple = ()
    clear: bool = False


@dataclass(frozen=True)
class Ping:
    pingId: int


@dataclass(frozen=True)
class GoAway:
    lastGoodStreamId: int
    status: int = GOAWAY_OK


@dataclass(frozen=True)
class Headers:
    streamId: int
    headers: tuple = ()
    fin: bool = False


@dataclass(frozen=True)
class WindowUpdate:
    """C{streamId} 0 updates the whole connection's window (SPDY/3.1)."""

    streamId: int
    delta: int


def headerValues(headers, name):
    """Every value of header C{name} in a tuple of pairs."""
    return [value for key, value in headers if key == name]


def _controlHeader(frameType, flags, length):
    if length > MAX_LENGTH:
        raise ValueError(f"a SPDY frame holds at most {MAX_LENGTH} bytes, not {length}")
    return struct.pack("!HHI", 0x8000 | VERSION, frameType, (flags << 24) | length)


def _encodeHeaderBlock(headers):
    """The uncompressed block: repeated names become one NUL-joined value."""
    merged = {}
    for name, value in headers:
        merged.setdefault(name.lower().encode("utf-8"), []).append(value.encode("utf-8"))
    parts = [struct.pack("!I", len(merged))]
    for name, values in merged.items():
        value = b"\0".join(values)
        parts += [struct.pack("!I", len(name)), name, struct.pack("!I", len(value)), value]
    return b"".join(parts)


def _decodeHeaderBlock(block):
    def take(n):
        nonlocal offset
        if offset + n > len(block):
            raise ProtocolError("truncated header block")
        chunk = block[offset : offset + n]
        offset += n
        return chunk

    def string():
        (length,) = struct.unpack("!I", take(4))
        return take(length).decode("utf-8", "replace")

    offset = 0
    (count,) = struct.unpack("!I", take(4))
    headers = []
    for _ in range(count):
        name = string()
        headers += [(name, value) for value in string().split("\0")]
    if offset != len(block):
        raise ProtocolError("trailing bytes after the header block")
    return tuple(headers)


class FrameEncoder:
    """Frames to bytes, for one direction of one connection."""

    def __init__(self):
        self._deflate = zlib.compressobj(zdict=DICTIONARY)

    def _compress(self, headers):
        block = _encodeHeaderBlock(headers)
        return self._deflate.compress(block) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def encode(self, frame):
        """The bytes of C{frame}."""
        kind = type(frame)
        if kind is DataFrame:
            if len(frame.data) > MAX_LENGTH:
                raise ValueError(f"a SPDY frame holds at most {MAX_LENGTH} bytes")
            flags = FLAG_FIN if frame.fin else 0
            return struct.pack("!II", frame.streamId, (flags << 24) | len(frame.data)) + frame.data
        if kind is SynStream:
            flags = (FLAG_FIN if frame.fin else 0) | (
                FLAG_UNIDIRECTIONAL if frame.unidirectional else 0
            )
            body = struct.pack(
                "!IIBB", frame.streamId, frame.associatedTo, frame.priority << 5, frame.slot
            ) + self._compress(frame.headers)
            return _controlHeader(SYN_STREAM, flags, len(body)) + body
        if kind in (SynReply, Headers):
            body = struct.pack("!I", frame.streamId) + self._compress(frame.headers)
            frameType = SYN_REPLY if kind is SynReply else HEADERS
            return _controlHeader(frameType, FLAG_FIN if frame.fin else 0, len(body)) + body
        if kind is RstStream:
            return _controlHeader(RST_STREAM, 0, 8) + struct.pack(
                "!II", frame.streamId, frame.status
            )
        if kind is Settings:
            body = struct.pack("!I", len(frame.entries)) + b"".join(
                struct.pack("!II", (flags << 24) | key, value)
                for flags, key, value in frame.entries
            )
            flags = FLAG_SETTINGS_CLEAR if frame.clear else 0
            return _controlHeader(SETTINGS, flags, len(body)) + body
        if kind is Ping:
            return _controlHeader(PING, 0, 4) + struct.pack("!I", frame.pingId)
        if kind is GoAway:
            return _controlHeader(GOAWAY, 0, 8) + struct.pack(
                "!II", frame.lastGoodStreamId, frame.status
            )
        if kind is WindowUpdate:
            return _controlHeader(WINDOW_UPDATE, 0, 8) + struct.pack(
                "!II", frame.streamId, frame.delta
            )
        raise TypeError(f"not a SPDY frame: {frame!r}")


class FrameDecoder:
    """Bytes to frames, for one direction of one connection.

    Control frames of unknown types are skipped, as the specification asks.
    """

    def __init__(self):
        self._buffer = bytearray()
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)

    @property
    def buffered(self):
        """How many bytes of an incomplete frame are waiting for the rest."""
        return len(self._buffer)

    def feed(self, data):
        """Add received bytes; return the frames they complete, in order.

        @raise ProtocolError: for bytes that cannot be SPDY/3 frames.
        """
        self._buffer += data
        frames = []
        while len(self._buffer) >= 8:
            first, word = struct.unpack_from("!II", self._buffer)
            length = word & MAX_LENGTH
            if len(self._buffer) < 8 + length:
                break
            payload = bytes(self._buffer[8 : 8 + length])
            del self._buffer[: 8 + length]
            flags = word >> 24
            if first & 0x80000000:
                frame = self._control(first >> 16 & 0x7FFF, first & 0xFFFF, flags, payload)
            else:
                frame = DataFrame(first, payload, bool(flags & FLAG_FIN))
            if frame is not None:
                frames.append(frame)
        return frames

    def _headers(self, compressed):
        try:
            block = self._inflate.decompress(compressed, HEADER_BLOCK_LIMIT)
        except zlib.error as e:
            raise ProtocolError(f"header block does not decompress: {e}") from None
        if self._inflate.unconsumed_tail:
            raise ProtocolError(f"header block over {HEADER_BLOCK_LIMIT} bytes")
        return _decodeHeaderBlock(block)

    def _control(self, version, frameType, flags, payload):
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version} is not supported, only {VERSION}")
        fin = bool(flags & FLAG_FIN)
        if frameType == SYN_STREAM:
            _need(payload, 10, "SYN_STREAM")
            streamId, associated, priority, slot = struct.unpack_from("!IIBB", payload)
            return SynStream(
                streamId & MAX_STREAM_ID,
                self._headers(payload[10:]),
                associated & MAX_STREAM_ID,
                priority >> 5,
                slot,
                fin,
                bool(flags & FLAG_UNIDIRECTIONAL),
            )
        if frameType in (SYN_REPLY, HEADERS):
            _need(payload, 4, "SYN_REPLY" if frameType == SYN_REPLY else "HEADERS")
            (streamId,) = struct.unpack_from("!I", payload)
            kind = SynReply if frameType == SYN_REPLY else Headers
            return kind(streamId & MAX_STREAM_ID, self._headers(payload[4:]), fin)
        if frameType == RST_STREAM:
            _need(payload, 8, "RST_STREAM")
            streamId, status = struct.unpack_from("!II", payload)
            return RstStream(streamId & MAX_STREAM_ID, status)
        if frameType == SETTINGS:
            _need(payload, 4, "SETTINGS")
            (count,) = struct.unpack_from("!I", payload)
            _need(payload, 4 + 8 * count, "SETTINGS")
            entries = tuple(
                (word >> 24, word & MAX_LENGTH, value)
                for word, value in struct.iter_unpack("!II", payload[4 : 4 + 8 * count])
            )
            return Settings(entries, bool(flags & FLAG_SETTINGS_CLEAR))
        if frameType == PING:
            _need(payload, 4, "PING")
            return Ping(struct.unpack_from("!I", payload)[0])
        if frameType == GOAWAY:
            _need(payload, 8, "GOAWAY")
            lastGood, status = struct.unpack_from("!II", payload)
            return GoAway(lastGood & MAX_STREAM_ID, status)
        if frameType == WINDOW_UPDATE:
            _need(payload, 8, "WINDOW_UPDATE")
            streamId, delta = struct.unpack_from("!II", payload)
            return WindowUpdate(streamId & MAX_STREAM_ID, delta & MAX_STREAM_ID)
        return None


def _need(payload, size, name):
    if len(payload) < size:
        raise ProtocolError(f"{name} frame of {len(payload)} bytes, shorter than {size}")

"""Tunnel frame codec (sans-I/O): bytes in, frames out, and back.

Every frame starts with a fixed 12-byte header, network byte order::

    version:u8  type:u8  flags:u16  stream_id:u32  length:u32

``length`` is the payload size for DATA frames; for WINDOW_UPDATE it is the
credit granted, for PING the opaque value echoed back, for GOAWAY the error
code.  Only DATA frames carry a payload.  See docs/protocol.md.
"""

import struct

VERSION = 1

HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size

# Frame types.
DATA = 0
WINDOW_UPDATE = 1
PING = 2
GOAWAY = 3
TYPE_NAMES = {DATA: "DATA", WINDOW_UPDATE: "WINDOW_UPDATE", PING: "PING", GOAWAY: "GOAWAY"}

# Flags.
SYN = 0x1
ACK = 0x2
FIN = 0x4
RST = 0x8
ALL_FLAGS = SYN | ACK | FIN | RST

# Hard protocol limits.
MAX_STREAM_ID = 0xFFFFFFFF
DEFAULT_MAX_FRAME = 256 * 1024
INITIAL_WINDOW = 256 * 1024
MAX_WINDOW = 0x7FFFFFFF

# Error codes, carried by RST payloads and GOAWAY frames.
NORMAL = 0
PROTOCOL_ERROR = 1
INTERNAL_ERROR = 2
FLOW_CONTROL_ERROR = 3
REFUSED = 4
UNAUTHORIZED = 5
FORBIDDEN = 6
UNKNOWN_CLUSTER = 7
CLUSTER_OFFLINE = 8
UPSTREAM_UNREACHABLE = 9
GOING_AWAY = 10
TUNNEL_LOST = 11
TIMEOUT = 12
LIMIT_EXCEEDED = 13
CANCELLED = 14

ERROR_NAMES = {
    NORMAL: "NORMAL",
    PROTOCOL_ERROR: "PROTOCOL_ERROR",
    INTERNAL_ERROR: "INTERNAL_ERROR",
    FLOW_CONTROL_ERROR: "FLOW_CONTROL_ERROR",
    REFUSED: "REFUSED",
    UNAUTHORIZED: "UNAUTHORIZED",
    FORBIDDEN: "FORBIDDEN",
    UNKNOWN_CLUSTER: "UNKNOWN_CLUSTER",
    CLUSTER_OFFLINE: "CLUSTER_OFFLINE",
    UPSTREAM_UNREACHABLE: "UPSTREAM_UNREACHABLE",
    GOING_AWAY: "GOING_AWAY",
    TUNNEL_LOST: "TUNNEL_LOST",
    TIMEOUT: "TIMEOUT",
    LIMIT_EXCEEDED: "LIMIT_EXCEEDED",
    CANCELLED: "CANCELLED",
}

RST_CODE = struct.Struct("!I")
MAX_REASON = 1024


class ProtocolError(Exception):
    """The peer broke the framing rules; the tunnel must be closed."""

    def __init__(self, message, code=PROTOCOL_ERROR):
        super().__init__(message)
        self.code = code


def header(ftype, flags, stream_id, length):
    """Encode one frame header."""
    return HEADER.pack(VERSION, ftype, flags, stream_id, length)


def rst_payload(code, reason=""):
    """Payload of a DATA|RST frame: error code and a UTF-8 reason."""
    text = reason.encode("utf-8", "replace")[:MAX_REASON]
    return RST_CODE.pack(code) + text


def parse_rst(payload):
    """Decode an RST payload into ``(code, reason)``; tolerant of junk."""
    if len(payload) < RST_CODE.size:
        return PROTOCOL_ERROR, "reset without an error code"
    (code,) = RST_CODE.unpack_from(payload)
    return code, bytes(payload[RST_CODE.size:]).decode("utf-8", "replace")


def check_header(version, ftype, flags, stream_id, length, max_frame):
    """Raise :class:`ProtocolError`, naming the fault, unless the header is valid."""
    if version != VERSION:
        raise ProtocolError("unsupported tunnel protocol version %d (this side speaks %d)"
                            % (version, VERSION))
    if ftype not in TYPE_NAMES:
        raise ProtocolError("unknown frame type %d" % (ftype,))
    if flags & ~ALL_FLAGS:
        raise ProtocolError("unknown flags 0x%x" % (flags,))
    if ftype in (DATA, WINDOW_UPDATE):
        if stream_id == 0:
            raise ProtocolError("%s on stream 0" % (TYPE_NAMES[ftype],))
        if ftype == DATA and length > max_frame:
            raise ProtocolError("frame of %d bytes exceeds the limit of %d"
                                % (length, max_frame))
        if ftype == WINDOW_UPDATE and length > MAX_WINDOW:
            raise ProtocolError("window update of %d exceeds %d" % (length, MAX_WINDOW),
                                FLOW_CONTROL_ERROR)
    elif stream_id != 0:
        raise ProtocolError("%s on stream %d (must be 0)" % (TYPE_NAMES[ftype], stream_id))


class FrameDecoder:
    """Incremental decoder of whole frames (sessions use :class:`PieceDecoder`;
    this one is the reference that tools and tests read frames with).

    ``feed(data)`` returns the list of complete frames, each a tuple
    ``(type, flags, stream_id, length, payload)`` where payload is ``bytes``
    (empty for frames without one).  Malformed input raises
    :class:`ProtocolError`; after that the decoder refuses further input.
    Memory is bounded: at most one incomplete frame (header plus
    ``max_frame`` bytes) is held between calls.
    """

    def __init__(self, max_frame=DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()
        self._failed = None

    @property
    def buffered(self):
        return len(self._buf)

    def feed(self, data):
        if self._failed is not None:
            raise self._failed
        buf = self._buf
        if buf:
            buf += data
            view = buf
        else:
            view = data
        frames = []
        offset = 0
        end = len(view)
        unpack = HEADER.unpack_from
        while end - offset >= HEADER_SIZE:
            version, ftype, flags, stream_id, length = unpack(view, offset)
            try:
                check_header(version, ftype, flags, stream_id, length, self.max_frame)
            except ProtocolError as e:
                self._failed = e
                self._buf = bytearray()
                raise
            if ftype == DATA:
                stop = offset + HEADER_SIZE + length
                if stop > end:
                    break
                payload = bytes(view[offset + HEADER_SIZE:stop])
                offset = stop
            else:
                payload = b""
                offset += HEADER_SIZE
            frames.append((ftype, flags, stream_id, length, payload))
        if offset < end:
            # Keep the incomplete tail (at most one frame) for next time.
            if buf:
                del buf[:offset]
            else:
                self._buf = bytearray(view[offset:])
        elif buf:
            buf.clear()
        return frames


# SYN and RST payloads (stream metadata, reset reasons) are handed over whole,
# so they are held until complete; this bounds what a peer can make us hold.
MAX_CONTROL_PAYLOAD = 64 * 1024


class PieceDecoder:
    """Incremental decoder that passes DATA payloads on as they arrive.

    ``feed(data)`` returns events ``(type, flags, stream_id, value,
    payload)`` in the shape of :class:`FrameDecoder`'s frames, except that
    the payload of a DATA frame comes in *pieces*, as soon as any of it is
    there: a frame split over two reads gives two events.  Every piece but
    the last of a frame has flags 0 and the last carries the frame's
    flags; ``value`` is the piece's length.  The payloads of SYN and RST
    frames (stream metadata, reset reasons) come whole, as ``bytes``, and
    may be at most :data:`MAX_CONTROL_PAYLOAD` bytes.

    With ``views`` the pieces are memoryviews of the data fed (no copy: the
    relay forwards them as they are), otherwise ``bytes``.

    Nothing waits for a whole frame, so at most a partial header and a
    partial SYN/RST payload are held between calls.  Malformed input raises
    :class:`ProtocolError`; after that the decoder refuses further input.
    """

    def __init__(self, max_frame=DEFAULT_MAX_FRAME, views=False):
        self.max_frame = max_frame
        self.views = views
        self._head = b""          # the start of a header split between reads
        self._left = 0            # payload bytes of the current DATA frame to come
        self._flags = 0           # ... its flags
        self._sid = 0             # ... its stream
        self._hold = None         # ... its SYN/RST payload so far (bytearray)
        self._failed = None

    @property
    def buffered(self):
        return len(self._head) + (len(self._hold) if self._hold is not None else 0)

    def feed(self, data):
        if self._failed is not None:
            raise self._failed
        out = []
        end = len(data)
        off = 0
        if self._left:
            off = self._payload(data, 0, end, out)
        elif self._head:
            need = HEADER_SIZE - len(self._head)
            if end < need:
                self._head += bytes(data)
                return out
            header = self._head + bytes(data[:need])
            self._head = b""
            off = self._frame(header, 0, data, need, end, out)
        unpack = HEADER.unpack_from
        while off < end:
            if end - off < HEADER_SIZE:
                self._head = bytes(data[off:end])
                break
            off = self._frame(data, off, data, off + HEADER_SIZE, end, out, unpack)
        return out

    def _frame(self, hdata, hoff, data, off, end, out, unpack=HEADER.unpack_from):
        """Decode the header at ``hdata[hoff:]``; its payload starts at ``data[off]``."""
        version, ftype, flags, sid, length = unpack(hdata, hoff)
        if (version != VERSION or ftype > GOAWAY or flags & ~ALL_FLAGS
                or (ftype <= WINDOW_UPDATE) == (sid == 0)):
            self._fail(version, ftype, flags, sid, length)
        if ftype != DATA:
            if ftype == WINDOW_UPDATE and length > MAX_WINDOW:
                self._fail(version, ftype, flags, sid, length)
            out.append((ftype, flags, sid, length, b""))
            return off
        if length > self.max_frame:
            self._fail(version, ftype, flags, sid, length)
        if not length:
            out.append((DATA, flags, sid, 0, b""))
            return off
        self._flags = flags
        self._sid = sid
        self._left = length
        if flags & (SYN | RST):
            if length > MAX_CONTROL_PAYLOAD:
                self._failed = ProtocolError("%s payload of %d bytes exceeds the limit of %d"
                                             % ("SYN" if flags & SYN else "RST", length,
                                                MAX_CONTROL_PAYLOAD))
                raise self._failed
            self._hold = bytearray()
        return self._payload(data, off, end, out)

    def _payload(self, data, off, end, out):
        """Take what ``data[off:end]`` holds of the current frame's payload."""
        take = self._left
        if take > end - off:
            take = end - off
        if not take:
            return off
        self._left -= take
        stop = off + take
        hold = self._hold
        if hold is not None:
            hold += data[off:stop]
            if not self._left:
                self._hold = None
                out.append((DATA, self._flags, self._sid, len(hold), bytes(hold)))
            return stop
        if self.views:
            piece = memoryview(data)[off:stop]
        elif off == 0 and stop == len(data):
            piece = data if isinstance(data, bytes) else bytes(data)
        else:
            piece = data[off:stop]
            if not isinstance(piece, bytes):
                piece = bytes(piece)
        out.append((DATA, 0 if self._left else self._flags, self._sid, take, piece))
        return stop

    def _fail(self, version, ftype, flags, sid, length):
        try:
            check_header(version, ftype, flags, sid, length, self.max_frame)
            error = ProtocolError("malformed frame header")
        except ProtocolError as e:
            error = e
        self._failed = error
        self._head = b""
        self._hold = None
        raise error

"""Tests for arc.tunnel.frames: the header codec and the incremental decoder."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from arc.tunnel import frames as F

FUZZ = settings(max_examples=300, deadline=None)


def encode(ftype, flags, sid, value, payload=b""):
    if ftype == F.DATA:
        value = len(payload)
    return F.header(ftype, flags, sid, value) + payload


def raw_header(version, ftype, flags, sid, length):
    return struct.pack("!BBHII", version, ftype, flags, sid, length)


def split(data, cuts):
    """``data`` cut at the (sorted, deduplicated) offsets in ``cuts``."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


class HeaderTests(unittest.TestCase):
    def test_layout(self):
        raw = F.header(F.WINDOW_UPDATE, F.ACK, 7, 65536)
        self.assertEqual(len(raw), F.HEADER_SIZE)
        self.assertEqual(F.HEADER_SIZE, 12)
        self.assertEqual(raw, b"\x01\x01\x00\x02\x00\x00\x00\x07\x00\x01\x00\x00")

    def test_names_cover_every_code(self):
        codes = [v for k, v in vars(F).items()
                 if k.isupper() and isinstance(v, int) and k in F.ERROR_NAMES.values()]
        self.assertEqual(sorted(codes), sorted(F.ERROR_NAMES))
        self.assertEqual(len(set(F.ERROR_NAMES.values())), len(F.ERROR_NAMES))


class RoundTripTests(unittest.TestCase):
    def test_every_type(self):
        frames = [
            (F.DATA, F.SYN, 1, b'{"cluster": "c"}'),
            (F.DATA, 0, 1, b"x" * 1000),
            (F.DATA, F.FIN, 1, b""),
            (F.DATA, F.RST, 3, F.rst_payload(F.FORBIDDEN, "no")),
            (F.WINDOW_UPDATE, F.ACK, 2, 4096),
            (F.WINDOW_UPDATE, 0, 2, F.MAX_WINDOW),
            (F.PING, F.SYN, 0, 0xFFFFFFFF),
            (F.PING, F.ACK, 0, 17),
            (F.GOAWAY, 0, 0, F.GOING_AWAY),
        ]
        wire = b""
        expected = []
        for ftype, flags, sid, x in frames:
            if ftype == F.DATA:
                wire += encode(ftype, flags, sid, 0, x)
                expected.append((ftype, flags, sid, len(x), x))
            else:
                wire += encode(ftype, flags, sid, x)
                expected.append((ftype, flags, sid, x, b""))
        decoder = F.FrameDecoder()
        self.assertEqual(decoder.feed(wire), expected)
        self.assertEqual(decoder.buffered, 0)

    def test_byte_at_a_time(self):
        payload = bytes(range(256)) * 4
        wire = (encode(F.DATA, F.SYN, 5, 0, b"meta") + encode(F.PING, F.SYN, 0, 9)
                + encode(F.DATA, 0, 5, 0, payload) + encode(F.DATA, F.FIN, 5, 0))
        decoder = F.FrameDecoder()
        got = []
        for i in range(len(wire)):
            got.extend(decoder.feed(wire[i:i + 1]))
            self.assertLess(decoder.buffered, F.HEADER_SIZE + len(payload))
        self.assertEqual(got, [(F.DATA, F.SYN, 5, 4, b"meta"), (F.PING, F.SYN, 0, 9, b""),
                               (F.DATA, 0, 5, len(payload), payload),
                               (F.DATA, F.FIN, 5, 0, b"")])
        self.assertEqual(decoder.buffered, 0)

    def test_partial_frame_kept(self):
        decoder = F.FrameDecoder()
        wire = encode(F.DATA, 0, 1, 0, b"abcdef")
        self.assertEqual(decoder.feed(wire[:5]), [])
        self.assertEqual(decoder.buffered, 5)
        self.assertEqual(decoder.feed(wire[5:15]), [])
        self.assertEqual(decoder.buffered, 15)
        self.assertEqual(decoder.feed(wire[15:] + wire[:3]), [(F.DATA, 0, 1, 6, b"abcdef")])
        self.assertEqual(decoder.buffered, 3)

    def test_payload_is_bytes(self):
        decoder = F.FrameDecoder()
        [frame] = decoder.feed(memoryview(encode(F.DATA, 0, 1, 0, b"abc")))
        self.assertIsInstance(frame[4], bytes)

    def test_max_frame_exactly(self):
        decoder = F.FrameDecoder(max_frame=16)
        frames = decoder.feed(encode(F.DATA, 0, 1, 0, b"y" * 16))
        self.assertEqual(frames, [(F.DATA, 0, 1, 16, b"y" * 16)])

    def test_length_of_non_data_is_a_value(self):
        # A WINDOW_UPDATE larger than max_frame is fine: it carries no payload.
        decoder = F.FrameDecoder(max_frame=16)
        self.assertEqual(decoder.feed(encode(F.WINDOW_UPDATE, 0, 1, 1 << 20)),
                         [(F.WINDOW_UPDATE, 0, 1, 1 << 20, b"")])


class ProtocolErrorTests(unittest.TestCase):
    Decoder = F.FrameDecoder

    def assertRejected(self, wire, words, code=F.PROTOCOL_ERROR, max_frame=F.DEFAULT_MAX_FRAME):
        decoder = self.Decoder(max_frame)
        e = self.assertRaises(F.ProtocolError, decoder.feed, wire)
        self.assertEqual(e.code, code)
        self.assertIn(words, str(e))
        # The decoder stays failed and holds nothing.
        self.assertEqual(decoder.buffered, 0)
        e2 = self.assertRaises(F.ProtocolError, decoder.feed, encode(F.PING, F.SYN, 0, 1))
        self.assertIs(e2, e)
        return e

    def test_bad_version(self):
        e = self.assertRejected(raw_header(2, F.DATA, 0, 1, 0), "version 2")
        self.assertIn("speaks 1", str(e))

    def test_version_zero(self):
        self.assertRejected(raw_header(0, F.PING, 0, 0, 0), "version 0")

    def test_unknown_type(self):
        self.assertRejected(raw_header(1, 4, 0, 1, 0), "unknown frame type 4")

    def test_unknown_flags(self):
        self.assertRejected(raw_header(1, F.DATA, 0x10, 1, 0), "unknown flags 0x10")
        self.assertRejected(raw_header(1, F.PING, 0x8000, 0, 0), "unknown flags 0x8000")

    def test_data_on_stream_zero(self):
        self.assertRejected(raw_header(1, F.DATA, 0, 0, 0), "DATA on stream 0")

    def test_window_update_on_stream_zero(self):
        self.assertRejected(raw_header(1, F.WINDOW_UPDATE, 0, 0, 10), "WINDOW_UPDATE on stream 0")

    def test_ping_on_stream(self):
        self.assertRejected(raw_header(1, F.PING, F.SYN, 3, 0), "PING on stream 3")

    def test_goaway_on_stream(self):
        self.assertRejected(raw_header(1, F.GOAWAY, 0, 4, 0), "GOAWAY on stream 4")

    def test_oversize_data(self):
        self.assertRejected(raw_header(1, F.DATA, 0, 1, 17), "17 bytes exceeds the limit of 16",
                            max_frame=16)

    def test_oversize_data_detected_from_header_alone(self):
        # The payload is never waited for: the header is enough to refuse it.
        decoder = self.Decoder(16)
        self.assertRaises(F.ProtocolError, decoder.feed, raw_header(1, F.DATA, 0, 1, 1 << 30))

    def test_window_update_too_large(self):
        self.assertRejected(raw_header(1, F.WINDOW_UPDATE, 0, 1, F.MAX_WINDOW + 1),
                            "window update", code=F.FLOW_CONTROL_ERROR)

    def test_error_after_good_frames(self):
        # Frames before the bad one in the same chunk are lost with the tunnel,
        # but the error is reported, never swallowed.
        decoder = self.Decoder()
        wire = encode(F.PING, F.SYN, 0, 1) + raw_header(9, 0, 0, 0, 0)
        self.assertRaises(F.ProtocolError, decoder.feed, wire)

    def test_error_in_buffered_header(self):
        decoder = self.Decoder()
        self.assertEqual(decoder.feed(raw_header(1, 7, 0, 0, 0)[:6]), [])
        self.assertRaises(F.ProtocolError, decoder.feed, b"\x00" * 6)
        self.assertEqual(decoder.buffered, 0)


class PieceDecoderProtocolErrorTests(ProtocolErrorTests):
    """The decoder the tunnel sessions use refuses the same input the same way."""

    Decoder = F.PieceDecoder

    def test_oversize_control_payload(self):
        # SYN and RST payloads are held whole, so they are bounded on their own.
        for flag, name in ((F.SYN, "SYN"), (F.RST, "RST")):
            e = self.assertRejected(raw_header(1, F.DATA, flag, 1, F.MAX_CONTROL_PAYLOAD + 1),
                                    "%s payload of %d bytes" % (name, F.MAX_CONTROL_PAYLOAD + 1))
            self.assertEqual(e.code, F.PROTOCOL_ERROR)


class PieceDecoderTests(unittest.TestCase):
    def test_payload_handed_on_as_it_arrives(self):
        decoder = F.PieceDecoder()
        wire = encode(F.DATA, F.FIN, 3, 0, b"abcdefgh")
        self.assertEqual(decoder.feed(wire[:F.HEADER_SIZE + 3]), [(F.DATA, 0, 3, 3, b"abc")])
        self.assertEqual(decoder.buffered, 0)
        # The last piece carries the frame's flags.
        self.assertEqual(decoder.feed(wire[F.HEADER_SIZE + 3:]),
                         [(F.DATA, F.FIN, 3, 5, b"defgh")])

    def test_header_split_between_reads(self):
        decoder = F.PieceDecoder()
        wire = encode(F.DATA, 0, 3, 0, b"xyz") + encode(F.PING, F.SYN, 0, 7)
        self.assertEqual(decoder.feed(wire[:5]), [])
        self.assertEqual(decoder.buffered, 5)
        self.assertEqual(decoder.feed(wire[5:]),
                         [(F.DATA, 0, 3, 3, b"xyz"), (F.PING, F.SYN, 0, 7, b"")])
        self.assertEqual(decoder.buffered, 0)

    def test_control_payloads_come_whole(self):
        decoder = F.PieceDecoder()
        reset = F.rst_payload(F.FORBIDDEN, "no access")
        wire = encode(F.DATA, F.SYN, 5, 0, b'{"cluster": "c"}') + encode(F.DATA, F.RST, 5, 0, reset)
        got = []
        for i in range(len(wire)):
            got.extend(decoder.feed(wire[i:i + 1]))
        self.assertEqual(got, [(F.DATA, F.SYN, 5, 16, b'{"cluster": "c"}'),
                               (F.DATA, F.RST, 5, len(reset), reset)])
        self.assertIsInstance(got[0][4], bytes)

    def test_views_are_memoryviews_of_the_input(self):
        decoder = F.PieceDecoder(views=True)
        wire = encode(F.DATA, 0, 1, 0, b"payload")
        [(ftype, flags, sid, n, piece)] = decoder.feed(wire)
        self.assertIsInstance(piece, memoryview)
        self.assertEqual(bytes(piece), b"payload")
        self.assertIs(piece.obj, wire)

    def test_bytes_without_views(self):
        decoder = F.PieceDecoder()
        [frame] = decoder.feed(encode(F.DATA, 0, 1, 0, b"abc"))
        self.assertIsInstance(frame[4], bytes)

    def test_nothing_waits_for_a_whole_frame(self):
        # A frame of the maximum size is handed on piece by piece: the decoder
        # holds no payload, however the frame is cut.
        decoder = F.PieceDecoder(max_frame=1 << 20)
        payload = bytes(range(256)) * 4096
        wire = encode(F.DATA, F.FIN, 9, 0, payload)
        got = []
        for i in range(0, len(wire), 1000):
            got.extend(decoder.feed(wire[i:i + 1000]))
            self.assertLess(decoder.buffered, F.HEADER_SIZE)
        self.assertEqual(b"".join(p for _, _, _, _, p in got), payload)
        self.assertEqual([f for _, f, _, _, _ in got], [0] * (len(got) - 1) + [F.FIN])


class ResetPayloadTests(unittest.TestCase):
    def test_round_trip(self):
        payload = F.rst_payload(F.CLUSTER_OFFLINE, "cluster 'prod' is offline \u2014 retry")
        self.assertEqual(payload[:4], b"\x00\x00\x00\x08")
        self.assertEqual(F.parse_rst(payload),
                         (F.CLUSTER_OFFLINE, "cluster 'prod' is offline \u2014 retry"))

    def test_empty_reason(self):
        self.assertEqual(F.parse_rst(F.rst_payload(F.NORMAL)), (F.NORMAL, ""))

    def test_reason_bounded(self):
        payload = F.rst_payload(F.INTERNAL_ERROR, "x" * 5000)
        self.assertEqual(len(payload), 4 + F.MAX_REASON)

    def test_truncation_inside_a_character(self):
        payload = F.rst_payload(F.REFUSED, "x" * (F.MAX_REASON - 1) + "\u00e9")
        code, reason = F.parse_rst(payload)
        self.assertEqual(code, F.REFUSED)
        self.assertTrue(reason.startswith("x" * (F.MAX_REASON - 1)))

    def test_short_payloads(self):
        for junk in (b"", b"\x00", b"\x00\x00\x01"):
            code, reason = F.parse_rst(junk)
            self.assertEqual(code, F.PROTOCOL_ERROR)
            self.assertIn("without an error code", reason)

    def test_invalid_utf8(self):
        code, reason = F.parse_rst(b"\x00\x00\x00\x05\xff\xfebad")
        self.assertEqual(code, F.UNAUTHORIZED)
        self.assertTrue(reason.endswith("bad"))
        self.assertIn("\ufffd", reason)

    def test_unknown_code_kept(self):
        self.assertEqual(F.parse_rst(b"\xff\xff\xff\xffwhy"), (0xFFFFFFFF, "why"))

    def test_memoryview_payload(self):
        self.assertEqual(F.parse_rst(memoryview(F.rst_payload(F.TIMEOUT, "t"))), (F.TIMEOUT, "t"))


# -- properties -------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
cuts = st.lists(st.integers(0, 1 << 16), max_size=20)

# Headers that are plausible enough to get past the version check, so that the
# fuzzing reaches the later checks and the payload buffering.
plausible_header = st.builds(
    lambda ftype, flags, sid, length: raw_header(1, ftype, flags, sid, length),
    st.integers(0, 5), st.sampled_from([0, F.SYN, F.ACK, F.FIN, F.RST, F.ALL_FLAGS, 0x40]),
    st.sampled_from([0, 1, 2, 0xFFFFFFFF]),
    st.one_of(st.integers(0, 80), u32))
noise = st.one_of(st.binary(max_size=100), plausible_header,
                  plausible_header.map(lambda h: h + b"z" * 40))
arbitrary_bytes = st.lists(noise, max_size=12).map(b"".join)


def valid_frame(max_frame):
    data = st.tuples(st.just(F.DATA), st.integers(0, F.ALL_FLAGS), st.integers(1, F.MAX_STREAM_ID),
                     st.binary(max_size=max_frame)).map(
        lambda t: (t[0], t[1], t[2], len(t[3]), t[3]))
    window = st.tuples(st.just(F.WINDOW_UPDATE), st.integers(0, F.ALL_FLAGS),
                       st.integers(1, F.MAX_STREAM_ID), st.integers(0, F.MAX_WINDOW),
                       st.just(b""))
    control = st.tuples(st.sampled_from([F.PING, F.GOAWAY]), st.integers(0, F.ALL_FLAGS),
                        st.just(0), u32, st.just(b""))
    return st.one_of(data, window, control)


class PropertyTests(unittest.TestCase):
    MAX_FRAME = 64

    @FUZZ
    @given(arbitrary_bytes, cuts)
    def test_arbitrary_input_is_frames_or_protocol_error(self, data, at):
        decoder = F.FrameDecoder(self.MAX_FRAME)
        for piece in split(data, at):
            try:
                frames = decoder.feed(piece)
            except F.ProtocolError:
                self.assertEqual(decoder.buffered, 0)
                return
            for ftype, flags, sid, length, payload in frames:
                self.assertIn(ftype, F.TYPE_NAMES)
                self.assertEqual(flags & ~F.ALL_FLAGS, 0)
                if ftype == F.DATA:
                    self.assertEqual(len(payload), length)
                    self.assertLessEqual(length, self.MAX_FRAME)
                else:
                    self.assertEqual(payload, b"")
            self.assertLessEqual(decoder.buffered, F.HEADER_SIZE + self.MAX_FRAME)

    @FUZZ
    @given(st.data())
    def test_valid_frames_survive_any_chunking(self, data):
        frames = data.draw(st.lists(valid_frame(self.MAX_FRAME), max_size=15))
        wire = b"".join(F.header(ftype, flags, sid, length) + payload
                        for ftype, flags, sid, length, payload in frames)
        decoder = F.FrameDecoder(self.MAX_FRAME)
        got = []
        for piece in split(wire, data.draw(cuts)):
            got.extend(decoder.feed(piece))
            self.assertLessEqual(decoder.buffered, F.HEADER_SIZE + self.MAX_FRAME)
        self.assertEqual(got, frames)
        self.assertEqual(decoder.buffered, 0)


class PiecePropertyTests(unittest.TestCase):
    MAX_FRAME = 64

    @FUZZ
    @given(arbitrary_bytes, cuts, st.booleans())
    def test_arbitrary_input_is_pieces_or_protocol_error(self, data, at, views):
        decoder = F.PieceDecoder(self.MAX_FRAME, views=views)
        for piece in split(data, at):
            try:
                events = decoder.feed(piece)
            except F.ProtocolError:
                self.assertEqual(decoder.buffered, 0)
                return
            for ftype, flags, sid, value, payload in events:
                self.assertIn(ftype, F.TYPE_NAMES)
                self.assertEqual(flags & ~F.ALL_FLAGS, 0)
                if ftype == F.DATA:
                    self.assertEqual(len(payload), value)
                    self.assertLessEqual(value, self.MAX_FRAME)
                else:
                    self.assertEqual(payload, b"")
            # A partial header, or a SYN/RST payload being collected: nothing more.
            self.assertLessEqual(decoder.buffered, F.HEADER_SIZE + self.MAX_FRAME)

    @FUZZ
    @given(st.data())
    def test_pieces_rejoin_into_the_frames_sent(self, data):
        frames = data.draw(st.lists(valid_frame(self.MAX_FRAME), max_size=15))
        wire = b"".join(F.header(ftype, flags, sid, length) + payload
                        for ftype, flags, sid, length, payload in frames)
        decoder = F.PieceDecoder(self.MAX_FRAME, views=data.draw(st.booleans()))
        events = []
        for piece in split(wire, data.draw(cuts)):
            events.extend(decoder.feed(piece))
        self.assertEqual(decoder.buffered, 0)
        # Join the pieces of each DATA frame: every piece but a frame's last has
        # flags 0, and each frame's pieces come in order with nothing between.
        rebuilt = []
        current = None
        for ftype, flags, sid, value, payload in events:
            if ftype != F.DATA:
                self.assertIsNone(current)
                rebuilt.append((ftype, flags, sid, value, payload))
                continue
            if current is None:
                current = [sid, b""]
            self.assertEqual(sid, current[0])
            current[1] += bytes(payload)
            expected = frames[len(rebuilt)]
            if len(current[1]) == expected[3]:
                rebuilt.append((F.DATA, flags, sid, len(current[1]), current[1]))
                current = None
            else:
                self.assertEqual(flags, 0)
        self.assertIsNone(current)
        self.assertEqual(rebuilt, frames)

"""Relay stream pairing: frames move between two tunnels undecoded.

A stream the client opens is paired with a stream the relay opens on the
agent's tunnel.  Each side is a :class:`Half` registered as the stream's
handler in its own session.  DATA payloads are forwarded as they are, with
only the 12-byte header re-encoded for the other tunnel's stream id.

The relay keeps no per-stream buffer of its own: flow control is end to
end, and each half only checks that its sender stays within the credit the
far end granted (a sender that ignores it is reset, so one client cannot
make the relay buffer without bound).
"""

from arc.tunnel import frames as F
from arc.tunnel.session import BULK_AFTER

_header = F.header
_DATA = F.DATA
_RST = F.RST
_FIN = F.FIN


class Half:
    __slots__ = ("session", "id", "peer", "credit", "fin", "bytes", "on_end", "label", "rst")

    def __init__(self, session, label, on_end=None):
        self.session = session
        self.label = label
        self.id = None
        self.peer = None
        self.credit = F.INITIAL_WINDOW
        self.fin = False
        self.bytes = 0
        self.on_end = on_end
        self.rst = None   # (code, reason) when a reset on this side ended the pair

    def frameReceived(self, ftype, flags, value, payload):
        peer = self.peer
        if ftype == _DATA:
            if flags & _RST:
                self.rst = F.parse_rst(payload)
                peer.session.send([_header(_DATA, flags, peer.id, len(payload)), payload])
                self._end()
                return
            n = len(payload)
            if n:
                self.credit -= n
                if self.credit < 0:
                    reason = "sender exceeded its flow-control window"
                    self.rst = (F.FLOW_CONTROL_ERROR, reason)
                    self.session.send_reset(self.id, F.FLOW_CONTROL_ERROR, reason)
                    peer.session.send_reset(peer.id, F.FLOW_CONTROL_ERROR, reason)
                    self._end()
                    return
                self.bytes += n
                peer.session.send([_header(_DATA, flags, peer.id, n), payload],
                                  self.bytes > BULK_AFTER)
            else:
                peer.session.send([_header(_DATA, flags, peer.id, 0)], self.bytes > BULK_AFTER)
            if flags & _FIN:
                self.fin = True
                if peer.fin:
                    self._end()
        else:
            # WINDOW_UPDATE: credit for the other direction, passed through.
            peer.credit += value
            peer.session.send([_header(ftype, flags, peer.id, value)])

    def reset(self, code, reason):
        """Reset both streams of the pair now (the relay is stopping)."""
        if self.session.streams.get(self.id) is not self:
            return
        self.session.send_reset(self.id, code, reason)
        self.rst = (code, reason)
        peer = self.peer
        if peer is not None:
            peer.session.send_reset(peer.id, code, reason)
        self._end()

    def tunnelLost(self, code, reason):
        peer = self.peer
        if peer is not None:
            self.rst = (code, "%s lost its tunnel to the relay: %s" % (self.label, reason))
            peer.session.send_reset(peer.id, code, self.rst[1])
            peer.session.remove(peer.id)
        self._finish()

    def _end(self):
        self.session.remove(self.id)
        peer = self.peer
        if peer is not None:
            peer.session.remove(peer.id)
        self._finish()

    def _finish(self):
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)
        peer = self.peer
        if peer is not None and peer.on_end is not None:
            on_end, peer.on_end = peer.on_end, None
            on_end(peer)


def pair(a, b):
    a.peer = b
    b.peer = a

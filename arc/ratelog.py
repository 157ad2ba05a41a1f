"""Rate-limited log lines: a flood of the same violation logs once per interval.

A hostile or broken peer can trigger the same refusal thousands of times a
second; the log must name the first one and then count the rest, not grow
by a line per attempt.
"""


class RateLimitedLog:
    """At most one line per ``key`` every ``interval`` seconds.

    ``emit(key, log_method, format, **fields)`` logs when the key's last line
    is older than ``interval``; lines held back meanwhile are counted and the
    next line carries ``suppressed=N``.  Keys are kept in a bounded table.
    """

    def __init__(self, clock, interval=60.0, max_keys=1024):
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self._last = {}   # key -> [time of the last line, lines suppressed since]

    def emit(self, key, method, fmt, **fields):
        now = self.clock.seconds()
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        suppressed = entry[1] if entry is not None else 0
        if entry is None and len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = [now, 0]
        method(fmt + " (same event {suppressed} more times in the last {interval:.0f} s)"
               if suppressed else fmt, suppressed=suppressed, interval=self.interval, **fields)
        return True

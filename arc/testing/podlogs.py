"""Container logs of emulated pods (``GET .../pods/NAME/log``).

Every container has a few fixed lines.  A pod annotated with
``arc.testing/tick-seconds`` also produces a ``tick N`` line that often
while its log is followed (``follow=true``), so ``kubectl logs -f`` shows
output arriving over time; the pre-created ``ticker`` pod ticks every 0.2 s.
"""

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from arc.testing.apiresources import nowUTC

TICK_ANNOTATION = "arc.testing/tick-seconds"


def fixedLines(pod, container):
    """The log a container has from its start."""
    prefix = f"{pod['metadata']['name']}/{container}"
    return [f"{prefix}: started", f"{prefix}: image {_image(pod, container)}", f"{prefix}: ready"]


def _image(pod, container):
    containers = pod.get("spec", {}).get("containers", [])
    return next((c.get("image", "") for c in containers if c.get("name") == container), "")


def tickInterval(pod):
    """Seconds between ticks of a followed log, or C{None} if it never ticks."""
    value = (pod["metadata"].get("annotations") or {}).get(TICK_ANNOTATION)
    try:
        interval = float(value)
    except (TypeError, ValueError):
        return None
    return interval if interval > 0 else None


class LogFormat:
    """How lines are rendered: optional RFC 3339 timestamps (``timestamps``)."""

    def __init__(self, clock, timestamps=False):
        self._clock = clock
        self._timestamps = timestamps

    def render(self, lines):
        """The bytes of C{lines}, one per line."""
        if self._timestamps:
            stamp = nowUTC(self._clock).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            lines = [f"{stamp} {line}" for line in lines]
        return "".join(line + "\n" for line in lines).encode("utf-8")


class LogFollower:
    """Keep a followed log open, writing a tick line every C{interval}.

    @param request: the streaming response (chunked ``text/plain``).
    @param interval: seconds between ticks, or C{None} to stay silent.
    """

    log = Logger()

    def __init__(self, request, pod, container, logFormat, interval, clock):
        self._request = request
        self._prefix = f"{pod['metadata']['name']}/{container}"
        self._format = logFormat
        self._count = 0
        self._ticker = None
        if interval is not None:
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = clock
            self._ticker.start(interval, now=False)

    def _tick(self):
        self._count += 1
        self._request.write(self._format.render([f"{self._prefix}: tick {self._count}"]))

    def stop(self):
        """Stop ticking: the client went away or the server is stopping."""
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()

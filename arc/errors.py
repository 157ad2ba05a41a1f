"""Errors a person sees: each names the cause and, where there is one, the fix."""


class ConfigError(Exception):
    """A configuration file (or value) that cannot be used.

    Rendered as ``FILE: KEY: REASON`` so that start-up stops with everything
    needed to find and fix the problem.
    """

    def __init__(self, reason, *, file=None, key=None):
        self.reason = reason
        self.file = file
        self.key = key
        super().__init__(str(self))

    def __str__(self):
        parts = []
        if self.file:
            parts.append(str(self.file))
        if self.key:
            parts.append(str(self.key))
        parts.append(self.reason)
        return ": ".join(parts)

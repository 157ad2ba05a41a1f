"""Where the ``arc`` command keeps its files (one directory per user)."""

import os


def config_dir(environ=None):
    """``$ARC_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/arc``, else ``~/.config/arc``."""
    environ = os.environ if environ is None else environ
    if environ.get("ARC_CONFIG_DIR"):
        return os.path.abspath(environ["ARC_CONFIG_DIR"])
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "arc")


class DaemonPaths:
    """The client daemon's configuration, pid file, log and control socket."""

    def __init__(self, base=None):
        self.base = base or config_dir()
        self.config = os.path.join(self.base, "client.yaml")
        self.pid = os.path.join(self.base, "client.pid")
        self.log = os.path.join(self.base, "client.log")
        self.control = os.path.join(self.base, "client.sock")
        self.state = os.path.join(self.base, "client-state")

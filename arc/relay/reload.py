"""Re-read the relay's registry while it runs, without dropping tunnels.

The relay's configuration file is checked every few seconds (one
``stat``) and on SIGHUP.  When it changed, it is loaded with the same
loader as at start-up; a file that does not load is refused with one log
line naming the file, the key and the reason, and the running
configuration stays.  A file that loads replaces the relay's registry in
one assignment, so every stream opened from then on is checked against the
new clusters, users and bindings, while streams already open go on.  Then:

- the tunnels of an agent whose cluster was removed, or whose token
  changed, are closed (the agent's reconnection is refused until its token
  matches again);
- the tunnels of a client authenticated by a static user token that was
  removed or changed (same name, other token or groups) are closed;
- every other tunnel stays up untouched.

Only ``clusters:``, ``users:`` and ``bindings:`` apply at once; other
changed keys (listen, tls, identity, tunnel, ...) are named in a warning
and apply at the next restart.

The stat signature includes the inode, so an atomic replace (``arc
cluster``, editors, a Kubernetes ConfigMap's symlink swap) is seen even
within one mtime tick.  A file modified less than a second ago is read at
the next poll instead, so that a file being written in place is not read
half-way.
"""

import os
import signal
import threading
import time

import yaml
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.logger import Logger

from arc.errors import ConfigError
from arc.relay.config import load_relay_config
from arc.tunnel import frames as F

APPLIED_AT_ONCE = ("clusters", "users", "bindings")
SETTLE = 1.0


def _signature(path):
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns), st.st_mtime


def _raw(path):
    """The file as plain data, to name the keys that need a restart (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


class RegistryReloader(MultiService):
    """Keeps ``relay.registry`` in step with the configuration file ``path``.

    :param relay: the :class:`~arc.relay.relay.Relay` whose registry is swapped.
    :param interval: seconds between checks of the file; 0 disables polling
        (SIGHUP and :meth:`reload` still work).
    :param hangup: install a SIGHUP handler while running (main thread only).
    :param loader: loads and validates the file (tests may replace it).
    :param walltime: the clock of file modification times.
    """

    log = Logger()

    def __init__(self, path, relay, reactor, *, interval=5.0, hangup=True,
                 loader=load_relay_config, walltime=time.time):
        super().__init__()
        self.path = os.path.abspath(path)
        self.relay = relay
        self.reactor = reactor
        self.loader = loader
        self.walltime = walltime
        self.hangup = hangup
        self._previous_hangup = None
        self.at_start = _raw(self.path)
        try:
            self.seen, _ = _signature(self.path)
        except OSError:
            self.seen = None
        self.reloads = 0
        self.refusals = 0
        if interval:
            timer = TimerService(interval, self.check)
            timer.clock = reactor
            timer.setServiceParent(self)

    # -- triggers ---------------------------------------------------------------

    def startService(self):
        super().startService()
        if self.hangup and threading.current_thread() is threading.main_thread():
            self._previous_hangup = signal.signal(signal.SIGHUP, self._sighup)

    def stopService(self):
        if self._previous_hangup is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
            self._previous_hangup = None
        return super().stopService()

    def _sighup(self, signum, frame):
        self.reactor.callFromThread(self.reload, "SIGHUP")

    def check(self):
        """One poll: reload if the file changed and has settled.  Never raises."""
        try:
            self._check()
        except Exception:
            self.log.failure("checking the relay configuration {file} failed", file=self.path)

    def _check(self):
        try:
            signature, mtime = _signature(self.path)
        except OSError as e:
            if self.seen is not None:
                self.log.warn("relay configuration {file} cannot be checked: {reason}; keeping "
                              "the running configuration", file=self.path, reason=e.strerror)
            self.seen = None
            return
        if signature == self.seen:
            return
        if 0 <= self.walltime() - mtime < SETTLE:
            return  # possibly still being written: look again at the next poll
        self.reload("file changed")

    # -- the swap -------------------------------------------------------------------

    def reload(self, why="reload"):
        """Load the file and apply its registry; returns True if applied."""
        try:
            self.seen, _ = _signature(self.path)
        except OSError:
            pass
        try:
            cfg = self.loader(self.path)
        except ConfigError as e:
            self.refusals += 1
            self.log.error("relay configuration not reloaded ({why}): {file}: {key}: {reason}; "
                           "the running configuration stays", why=why, file=e.file or self.path,
                           key=e.key or "-", reason=e.reason)
            return False
        except Exception:
            self.refusals += 1
            self.log.failure("relay configuration not reloaded ({why}): {file}; the running "
                             "configuration stays", why=why, file=self.path)
            return False
        self.apply(cfg.registry, why)
        self._warn_restart_only(_raw(self.path))
        return True

    def apply(self, new, why="reload"):
        """Swap in registry ``new``; close the tunnels it no longer admits."""
        old = self.relay.registry
        self.relay.registry = new
        self.reloads += 1
        agents = self._close_agents(old, new)
        clients = self._close_clients(old, new)
        self.log.info("relay configuration reloaded ({why}): {file}: clusters={clusters} "
                      "users={users} bindings={bindings}; closed agent_tunnels={agents} "
                      "client_tunnels={clients}", why=why, file=self.path,
                      clusters=len(new.clusters), users=len(new.users),
                      bindings=len(new.bindings), agents=agents, clients=clients)

    def _close_agents(self, old, new):
        closed = 0
        for cluster, sessions in list(self.relay.agents.items()):
            if cluster not in new.clusters:
                reason = "cluster %r was removed from the relay's registry" % (cluster,)
            elif new.clusters[cluster] != old.clusters.get(cluster):
                reason = "the agent token of cluster %r was replaced" % (cluster,)
            else:
                continue
            for session in list(sessions):
                session.fail(F.UNAUTHORIZED, reason)
                closed += 1
        return closed

    def _close_clients(self, old, new):
        """Clients admitted by a static token the new registry no longer holds as it was."""
        revoked = {identity for digest, identity in old.users.items()
                   if new.users.get(digest) != identity}
        closed = 0
        for session in list(self.relay.clients):
            identity = getattr(session, "identity", None)
            if identity in revoked:
                session.fail(F.UNAUTHORIZED, "the static token of user %r was removed or "
                                             "changed at the relay" % (identity.name,))
                closed += 1
        return closed

    def _warn_restart_only(self, raw):
        if raw is None or self.at_start is None:
            return
        changed = sorted(k for k in set(raw) | set(self.at_start)
                         if k not in APPLIED_AT_ONCE and raw.get(k) != self.at_start.get(k))
        if changed:
            self.log.warn("relay configuration {file}: changes to {keys} apply at the next "
                          "restart only (clusters, users and bindings applied now)",
                          file=self.path, keys=", ".join(map(str, changed)))

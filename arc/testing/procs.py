"""Child processes on loopback, for the demo and the integration tests.

Waits are polls bounded in time; every process logs to its own file and is
stopped (SIGTERM, then SIGKILL) by whoever started it.
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(predicate, timeout, what, interval=0.1, alive=None):
    """Poll ``predicate`` until true; ``alive`` (a Part) must keep running."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive.running():
            raise AssertionError("%s exited while waiting for %s; its log:\n%s"
                                 % (alive.name, what, alive.tail()))
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def twist(plugin, config):
    """argv running one arc part in the foreground, text log on stdout."""
    return [sys.executable, "-m", "twisted", "--log-format=text", plugin, "--config", config]


def _die_with_parent():
    """In the child: get SIGTERM when the process that started us dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Part:
    """One child process, logging to ``log``."""

    def __init__(self, name, argv, log, env=None):
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.proc = None

    def start(self):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         cwd=os.path.dirname(self.log), env=self.env,
                                         preexec_fn=_die_with_parent)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if not self.running():
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self):
        self.stop(signal.SIGKILL)

    def output(self):
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def tail(self, lines=20):
        return "\n".join(self.output().splitlines()[-lines:])


def start_apiserver(base, name="api", tokens=(), extra=(), log_dir=None):
    """Start the API server emulator with state in ``base/name``; returns the Part."""
    state = os.path.join(base, name)
    port_file = os.path.join(state, "port")
    if os.path.exists(port_file):
        os.unlink(port_file)  # left by an earlier run: wait for the new one
    argv = [sys.executable, "-m", "arc.testing.apiserver", "--state-dir", state]
    for token in tokens:
        argv += ["--token", token]
    argv += list(extra)
    part = Part(name, argv, os.path.join(log_dir or base, name + ".log")).start()
    wait_for(lambda: os.path.exists(port_file) and open(port_file).read().strip(), 30,
             "the API server emulator to listen", alive=part)
    wait_for(lambda: os.path.exists(os.path.join(state, "kubeconfig")), 10,
             "the API server emulator's kubeconfig", alive=part)
    part.state_dir = state
    part.kubeconfig = os.path.join(state, "kubeconfig")
    return part

"""Emulated commands behind ``kubectl exec``, framed as Kubernetes channels.

An L{ExecSession} is sans-I/O: it is fed the binary messages of the
``v4.channel.k8s.io``/``v5.channel.k8s.io`` WebSocket protocols and hands the
messages to send back to a callable.  The first byte of every message names
the channel: 0 stdin, 1 stdout, 2 stderr, 3 the final ``Status``, 4 terminal
resize, and in v5 255 to close a stream (payload: the channel closed).

Emulated commands: ``echo ARGS...``, ``cat`` (stdin to stdout until stdin is
closed), ``true``, ``false``, ``sh -c SCRIPT`` where SCRIPT is ``exit N`` or
one of these commands, and ``whoami`` (the caller's user name).  Anything
else fails with exit code 127.
"""

import json
import shlex

STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
PROTOCOLS = (V5, V4)

NOT_FOUND = 127


def chooseProtocol(offered):
    """The channel protocol to speak, best first, or C{None} if none fits."""
    return next((p for p in PROTOCOLS if p in offered), None)


def exitStatus(argv, code):
    """The channel-3 ``Status`` for a command that exited with C{code}."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": (
            "command terminated with non-zero exit code: error executing command "
            f"[{' '.join(argv)}], exit code {code}"
        ),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


class ExecSession:
    """One ``exec``: an emulated command wired to channel messages.

    @param argv: the command and its arguments (``command=`` parameters).
    @param username: the effective user, for ``whoami``.
    @param send: called with each binary message to send to the client.
    @param close: called once, after the final status has been sent.
    @param stdin: whether the client streams stdin (``stdin=true``).
    @param tty: whether stderr is merged into stdout, as on a terminal.
    """

    def __init__(self, argv, username, send, close, stdin=False, tty=False):
        self.argv = list(argv)
        self._username = username
        self._send = send
        self._close = close
        self._stdin = stdin
        self._tty = tty
        self._command = None
        self._connected = True
        self.exitCode = None

    def start(self):
        """Run the command; without a stdin stream, its stdin is empty."""
        self._command = commandFor(self.argv, self._username)
        self._command.start(self)
        if not self._stdin:
            self._stdinClosed()

    def messageReceived(self, message):
        """Handle one binary message from the client."""
        if not message or self.exitCode is not None:
            return
        channel, payload = message[0], bytes(message[1:])
        if channel == STDIN and payload:
            self._command.stdinReceived(self, payload)
        elif channel == CLOSE and payload[:1] == bytes([STDIN]):
            self._stdinClosed()

    def connectionLost(self):
        """The client went away: stdin is at its end, output goes nowhere."""
        self._connected = False
        self._stdinClosed()

    def stdout(self, data):
        self._output(STDOUT, data)

    def stderr(self, data):
        self._output(STDOUT if self._tty else STDERR, data)

    def exit(self, code):
        """End the command: send its status and close, once."""
        if self.exitCode is not None:
            return
        self.exitCode = code
        if self._connected:
            self._send(bytes([STATUS]) + json.dumps(exitStatus(self.argv, code)).encode())
            self._close()

    def _output(self, channel, data):
        if self.exitCode is None and self._connected and data:
            self._send(bytes([channel]) + data)

    def _stdinClosed(self):
        if self.exitCode is None:
            self._command.stdinClosed(self)


class Command:
    """An emulated command; by default it ignores stdin."""

    def start(self, session):
        """Called once when the session starts."""

    def stdinReceived(self, session, data):
        """Called with each chunk of stdin."""

    def stdinClosed(self, session):
        """Called once stdin is at its end."""


class Exit(Command):
    """Print C{output} and exit with C{code} at once."""

    def __init__(self, code, output=b"", errors=b""):
        self.code = code
        self.output = output
        self.errors = errors

    def start(self, session):
        session.stdout(self.output)
        session.stderr(self.errors)
        session.exit(self.code)


class Cat(Command):
    """Copy stdin to stdout; exit 0 when stdin ends."""

    def stdinReceived(self, session, data):
        session.stdout(data)

    def stdinClosed(self, session):
        session.exit(0)


def commandFor(argv, username):
    """The emulated L{Command} for C{argv}."""
    name, args = (argv[0], argv[1:]) if argv else ("", [])
    if name == "echo":
        return Exit(0, (" ".join(args) + "\n").encode())
    if name == "cat" and not args:
        return Cat()
    if name in ("true", "false") and not args:
        return Exit(int(name == "false"))
    if name == "whoami" and not args:
        return Exit(0, (username + "\n").encode())
    if name in ("sh", "/bin/sh", "bash", "/bin/bash") and len(args) == 2 and args[0] == "-c":
        return _script(name, args[1], username)
    return Exit(NOT_FOUND, errors=f"{name}: executable file not found in $PATH\n".encode())


def _script(shell, script, username):
    """``sh -c SCRIPT`` for a SCRIPT of one simple command or ``exit N``."""
    try:
        words = shlex.split(script)
    except ValueError as e:
        return Exit(2, errors=f"{shell}: syntax error: {e}\n".encode())
    if not words:
        return Exit(0)
    if words[0] != "exit":
        return commandFor(words, username)
    if len(words) > 2 or not all(w.isdigit() for w in words[1:]):
        return Exit(2, errors=f"{shell}: exit: illegal number: {' '.join(words[1:])}\n".encode())
    return Exit(int(words[1]) % 256 if len(words) == 2 else 0)

"""Emulated commands behind ``kubectl exec``, framed as Kubernetes channels.

An L{ExecSession} is sans-I/O: it is fed the binary messages of the
``v4.channel.k8s.io``/``v5.channel.k8s.io`` WebSocket protocols and hands the
messages to send back to a callable.  The first byte of every message names
the channel: 0 stdin, 1 stdout, 2 stderr, 3 the final ``Status``, 4 terminal
resize, and in v5 255 to close a stream (payload: the channel closed).

The same sessions serve SPDY, where each channel is a stream of its own
(L{arc.testing.spdyexec}), and ``attach``, whose command is the pod's main
process (L{LineEcho}).

Emulated commands: ``echo ARGS...``, ``cat`` (stdin to stdout until stdin is
closed), ``cat FILE...``, ``true``, ``false``, ``test -d|-f|-e PATH``,
``tar cf - PATH...`` and ``tar xmf - [-C DIR]`` (what ``kubectl cp`` runs,
on the pod's L{arc.testing.execfiles.PodFiles}), ``sh -c SCRIPT`` where
SCRIPT is ``exit N`` or one of these commands, and ``whoami`` (the caller's
user name).  Anything else fails with exit code 127.
"""

import json
import shlex

from arc.testing.execfiles import FileError

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
    """One ``exec`` or ``attach``: an emulated command wired to channel messages.

    @param argv: the command line, for the final status and for logs.
    @param command: the L{Command} to run.
    @param send: called with each binary message to send to the client.
    @param close: called once, after the final status has been sent.
    @param stdin: whether the client streams stdin (``stdin=true``).
    @param tty: whether stderr is merged into stdout, as on a terminal.
    """

    def __init__(self, argv, command, send, close, stdin=False, tty=False):
        self.argv = list(argv)
        self._command = command
        self._send = send
        self._close = close
        self._stdin = stdin
        self._tty = tty
        self._connected = True
        self.exitCode = None

    def start(self):
        """Run the command; without a stdin stream, its stdin is empty."""
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


class LineEcho(Command):
    """The main process of every emulated pod, as ``attach`` sees it.

    It echoes each line of stdin to stdout, and exits when stdin ends, as a
    container whose stdin is closed after its first attach (``stdinOnce``).
    """

    def __init__(self):
        self._pending = b""

    def stdinReceived(self, session, data):
        lines, newline, self._pending = (self._pending + data).rpartition(b"\n")
        session.stdout(lines + newline)

    def stdinClosed(self, session):
        session.stdout(self._pending)
        session.exit(0)


class CatFiles(Command):
    """``cat FILE...``: print files of the pod."""

    def __init__(self, paths, files):
        self._paths = paths
        self._files = files

    def start(self, session):
        code = 0
        for path in self._paths:
            try:
                session.stdout(self._files.read(path))
            except FileError as e:
                session.stderr(f"cat: {e}\n".encode())
                code = 1
        session.exit(code)


class TarCreate(Command):
    """``tar cf - PATH...``: write an archive of pod files to stdout."""

    def __init__(self, paths, files):
        self._paths = paths
        self._files = files

    def start(self, session):
        archive, errors = self._files.pack(self._paths)
        session.stderr("".join(f"tar: {e}\n" for e in errors).encode())
        session.stdout(archive)
        session.exit(1 if errors else 0)


class TarExtract(Command):
    """``tar xf - -C DIR``: read an archive from stdin into the pod's files."""

    def __init__(self, directory, files):
        self._directory = directory
        self._files = files
        self._archive = bytearray()

    def stdinReceived(self, session, data):
        self._archive += data

    def stdinClosed(self, session):
        try:
            self._files.unpack(bytes(self._archive), self._directory)
        except FileError as e:
            session.stderr(f"tar: {e}\n".encode())
            session.exit(1)
            return
        session.exit(0)


def commandFor(argv, username, files):
    """The emulated L{Command} for C{argv}.

    @param username: the effective user, for ``whoami``.
    @param files: the pod's L{arc.testing.execfiles.PodFiles}.
    """
    name, args = (argv[0], argv[1:]) if argv else ("", [])
    if name == "echo":
        return Exit(0, (" ".join(args) + "\n").encode())
    if name == "cat":
        return CatFiles(args, files) if args else Cat()
    if name in ("true", "false") and not args:
        return Exit(int(name == "false"))
    if name == "whoami" and not args:
        return Exit(0, (username + "\n").encode())
    if name == "test":
        return _test(args, files)
    if name == "tar":
        return _tar(args, files)
    if name in ("sh", "/bin/sh", "bash", "/bin/bash") and len(args) == 2 and args[0] == "-c":
        return _script(name, args[1], username, files)
    return Exit(NOT_FOUND, errors=f"{name}: executable file not found in $PATH\n".encode())


_TESTS = {
    "-d": lambda files, path: files.isDir(path),
    "-f": lambda files, path: files.isFile(path),
    "-e": lambda files, path: files.isDir(path) or files.isFile(path),
}


def _test(args, files):
    """``test -d|-f|-e PATH``: exit 0 when it holds, else 1."""
    if len(args) != 2 or args[0] not in _TESTS:
        return Exit(2, errors=f"test: unsupported expression: {' '.join(args)}\n".encode())
    return Exit(0 if _TESTS[args[0]](files, args[1]) else 1)


def _tar(args, files):
    """``tar`` creating to or extracting from ``-`` (stdout, stdin).

    Accepts old-style bundled flags (``cf``, ``xmf``), dashed ones
    (``-xmf``), ``-C DIR`` and the ``--no-same-*`` options kubectl adds.
    """
    words = list(args)
    if words and not words[0].startswith("-"):
        words[0] = "-" + words[0]
    mode, archive, directory, paths, needArgument = None, None, "/", [], []
    for word in words:
        if needArgument:
            flag = needArgument.pop(0)
            if flag == "f":
                archive = word
            else:
                directory = word
        elif word in ("--no-same-permissions", "--no-same-owner"):
            continue
        elif word.startswith("-") and not word.startswith("--") and len(word) > 1:
            for flag in word[1:]:
                if flag in "cx":
                    mode = flag
                elif flag in "fC":
                    needArgument.append(flag)
                elif flag not in "mvpo":
                    return _tarUsage(f"unsupported option -- '{flag}'")
        elif word.startswith("--"):
            return _tarUsage(f"unsupported option '{word}'")
        else:
            paths.append(word)
    if mode is None or archive != "-" or needArgument:
        return _tarUsage("only 'tar cf - PATH...' and 'tar xf - [-C DIR]' are emulated")
    if mode == "x":
        return TarExtract(directory, files)
    if not paths:
        return _tarUsage("empty archive")
    return TarCreate([files.resolve(p, directory) for p in paths], files)


def _tarUsage(message):
    return Exit(1, errors=f"tar: {message}\n".encode())


def _script(shell, script, username, files):
    """``sh -c SCRIPT`` for a SCRIPT of one simple command or ``exit N``."""
    try:
        words = shlex.split(script)
    except ValueError as e:
        return Exit(2, errors=f"{shell}: syntax error: {e}\n".encode())
    if not words:
        return Exit(0)
    if words[0] != "exit":
        return commandFor(words, username, files)
    if len(words) > 2 or not all(w.isdigit() for w in words[1:]):
        return Exit(2, errors=f"{shell}: exit: illegal number: {' '.join(words[1:])}\n".encode())
    return Exit(int(words[1]) % 256 if len(words) == 2 else 0)

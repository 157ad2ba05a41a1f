"""Credentials for the relay tunnel that come from a command.

``relay.token_command: "vault read -field=token secret/arc"`` runs the
command in the background (never blocking the reactor) when the part starts
and then every ``token_command_interval`` seconds; each (re)connection uses
the newest token.  The command may print the bare token or a
``client.authentication.k8s.io`` ExecCredential (as ``arc token`` does).
"""

import json
import os
import shlex

from twisted.application.internet import TimerService
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from arc.errors import ConfigError


def token_from_output(text):
    """The token in a command's output: an ExecCredential's, or the text itself."""
    text = text.strip()
    if text.startswith("{"):
        try:
            token = json.loads(text)["status"]["token"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("the output looks like JSON but is not an ExecCredential "
                             "with status.token")
        return token
    if not text or len(text.split()) != 1:
        raise ValueError("the command must print exactly one token")
    return text


class CommandToken:
    log = Logger()

    def __init__(self, command, interval=60.0):
        self.command = command
        self.argv = shlex.split(command)
        self.interval = interval
        self.token = None
        self.error = None

    def __call__(self):
        if self.token is None:
            raise ConfigError("the token command has not produced a token yet (%s)"
                              % (self.error or "still running",))
        return self.token

    def refresh(self):
        d = getProcessOutputAndValue(self.argv[0], self.argv[1:], env=dict(os.environ))
        d.addCallback(self._done)
        d.addErrback(self._failed)
        return d

    def _done(self, result):
        out, err, code = result
        if code != 0:
            self.error = "exit code %d: %s" % (code, err.decode("utf-8", "replace").strip()[-200:])
            self.log.error("token command {argv0} failed: {error}", argv0=self.argv[0],
                           error=self.error)
            return
        try:
            self.token = token_from_output(out.decode("utf-8", "replace"))
            self.error = None
        except ValueError as e:
            self.error = str(e)
            self.log.error("token command {argv0}: {error}", argv0=self.argv[0], error=self.error)

    def _failed(self, failure):
        self.error = failure.getErrorMessage()
        self.log.error("token command {argv0} could not run: {error}", argv0=self.argv[0],
                       error=self.error)

    def service(self):
        return TimerService(self.interval, self.refresh)

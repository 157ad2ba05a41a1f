"""``arc token``: the credential plugin kubectl runs before its requests.

It prints a ``client.authentication.k8s.io/v1`` ExecCredential on stdout::

    {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
     "status": {"token": "<ID token>", "expirationTimestamp": "2026-01-01T00:00:00Z"}}

The token comes from the login cache of ``--profile`` (see
:mod:`arc.cli.tokencache`); one expiring within ``--min-validity`` seconds
is refreshed first with the refresh token, under the profile's lock so
parallel kubectl runs refresh once.  Without a usable token it fails with
one line naming the fix, unless kubectl says a person is at the terminal
(``spec.interactive`` in ``$KUBERNETES_EXEC_INFO``): then it logs in again.

For CI, ``--from-file``, ``--from-env`` and ``--from-command`` take the
token from elsewhere; its expiry is the JWT's ``exp`` when it is a JWT.

This path runs before every kubectl request, so a valid cache is served
with the standard library only: no HTTP client, no reactor.
"""

import json
import os
import re
import sys
import time

from arc.cli import tokencache
from arc.cli.main import CommandError
from arc.errors import ConfigError

API_V1 = "client.authentication.k8s.io/v1"
API_V1BETA1 = "client.authentication.k8s.io/v1beta1"
MIN_VALIDITY = 60.0
COMMAND_TIMEOUT = 30.0
_TOKEN = re.compile(r"^[\x21-\x7e]+$")


def add_arguments(parser):
    parser.add_argument("--profile", default=tokencache.DEFAULT_PROFILE,
                        help="login profile (default: default)")
    parser.add_argument("--config", help="login settings file (default: "
                                         "$ARC_CONFIG_DIR/login.yaml)")
    parser.add_argument("--min-validity", type=float, default=MIN_VALIDITY,
                        help="refresh a token that expires within this many seconds "
                             "(default 60)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-file", metavar="PATH",
                        help="CI: use the token in this file instead of a login")
    source.add_argument("--from-env", metavar="VAR",
                        help="CI: use the token in this environment variable")
    source.add_argument("--from-command", metavar="CMD",
                        help="CI: use the token this command prints (run without a shell; "
                             "wrap pipes in sh -c '...')")
    parser.add_argument("--command-timeout", type=float, default=COMMAND_TIMEOUT,
                        help="seconds --from-command may take (default 30)")


# -- kubectl's side ---------------------------------------------------------------


def exec_info(environ=None):
    """``(interactive, apiVersion)`` from ``$KUBERNETES_EXEC_INFO``.

    Only ``spec.interactive`` is acted on; the answer uses v1 unless kubectl
    asked for v1beta1 (kubectl refuses an answer in another version than it
    asked for).  Anything unreadable counts as not interactive.
    """
    environ = os.environ if environ is None else environ
    try:
        info = json.loads(environ.get("KUBERNETES_EXEC_INFO") or "{}")
    except ValueError:
        return False, API_V1
    if not isinstance(info, dict):
        return False, API_V1
    spec = info.get("spec")
    interactive = isinstance(spec, dict) and spec.get("interactive") is True
    version = API_V1BETA1 if info.get("apiVersion") == API_V1BETA1 else API_V1
    return interactive, version


def exec_credential(token, expiry=None, api_version=API_V1):
    """The ExecCredential object for ``token`` (expiry in seconds since 1970, or None)."""
    status = {"token": token}
    if expiry is not None:
        status["expirationTimestamp"] = tokencache.rfc3339(expiry)
    return {"apiVersion": api_version, "kind": "ExecCredential", "status": status}


# -- tokens given by CI -----------------------------------------------------------


def _run_command(command, timeout):
    import shlex
    import subprocess

    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise CommandError("cannot split --from-command %r: %s" % (command, e)) from None
    if not argv:
        raise CommandError("--from-command is empty; give the command that prints the token")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise CommandError("--from-command: %s not found; give its full path" % (argv[0],)) \
            from None
    except OSError as e:
        raise CommandError("--from-command: cannot run %s (%s)" % (argv[0], e.strerror)) \
            from None
    except subprocess.TimeoutExpired:
        raise CommandError("--from-command: %s did not finish within %g s (--command-timeout)"
                           % (argv[0], timeout)) from None
    if done.returncode != 0:
        raise CommandError("--from-command: %s exited with status %d; see its messages above"
                           % (argv[0], done.returncode))
    return done.stdout.decode("utf-8", "replace")


def token_from_source(args, environ=None):
    """``(token, where it came from)`` for ``--from-file/--from-env/--from-command``."""
    environ = os.environ if environ is None else environ
    if args.from_file:
        where = "file %s" % (args.from_file,)
        try:
            with open(args.from_file, "r", encoding="utf-8") as f:
                text = f.read(1024 * 1024)
        except OSError as e:
            raise CommandError("cannot read the token %s: %s" % (where, e.strerror)) from None
        except UnicodeDecodeError:
            raise CommandError("the %s is not UTF-8 text" % (where,)) from None
    elif args.from_env:
        where = "environment variable %s" % (args.from_env,)
        if args.from_env not in environ:
            raise CommandError("%s is not set; set it to the token" % (where,))
        text = environ[args.from_env]
    else:
        where = "output of %s" % (args.from_command.split()[0] if args.from_command.split()
                                  else "--from-command",)
        text = _run_command(args.from_command, args.command_timeout)
    token = text.strip()
    if not token:
        raise CommandError("the %s is empty; it must hold the token" % (where,))
    if not _TOKEN.match(token):
        raise CommandError("the %s does not look like a token: it must be one line of "
                           "printable characters without spaces" % (where,))
    return token, where


def ci_credential(args, api_version, now=None):
    token, where = token_from_source(args)
    expiry = tokencache.jwt_expiry(token)
    now = time.time() if now is None else now
    if expiry is not None and expiry <= now:
        raise CommandError("the token from the %s expired %s ago; renew it"
                           % (where, tokencache.describe_delay(now - expiry)))
    return exec_credential(token, expiry, api_version)


# -- tokens from a login ----------------------------------------------------------


def _not_logged_in(profile, cause=None):
    fix = "run \"arc login --profile %s\"" % (profile,)
    if cause:
        return CommandError("%s; %s" % (cause, fix))
    return CommandError("not logged in: %s" % (fix,))


def _fresh(record, min_validity, now):
    expiry = record.get("expiry") if record else None
    if not isinstance(expiry, (int, float)):
        expiry = tokencache.jwt_expiry(record["id_token"]) if record else None
    return expiry is not None and expiry - now > min_validity


def _settings(profile_name, config):
    path = tokencache.config_path(config)
    return tokencache.load_profile(profile_name, path)


def refresh(cache, record, config):
    """Refresh ``record`` with its refresh token; the new record (saved)."""
    from arc.cli.oidcclient import OIDCError, Provider

    settings = _settings(cache.profile, config)
    ca_file = settings.ca_file if settings.issuer == record.get("issuer") else None
    try:
        provider = Provider(record["issuer"], ca_file=ca_file)
        answer = provider.refresh(record["client_id"], record["refresh_token"])
        id_token = provider.check_id_token(answer, record["client_id"])
    except (OIDCError, KeyError) as e:
        cause = e if isinstance(e, OIDCError) else "the cache lacks %s" % (e,)
        raise _not_logged_in(cache.profile, "cannot refresh the token of profile %s: %s"
                             % (cache.profile, cause)) from None
    rotated = answer.get("refresh_token")
    new = tokencache.new_record(record["issuer"], record["client_id"], id_token,
                                rotated if isinstance(rotated, str) and rotated
                                else record["refresh_token"])
    cache.save(new)
    return new


def login_again(cache, config):
    """Log in interactively (kubectl said a person is there); the new record (saved)."""
    from arc.cli.login import login, say

    settings = _settings(cache.profile, config)
    if not settings.issuer or not settings.client_id:
        raise _not_logged_in(cache.profile)
    say("arc token: logging in to %s (profile %s)" % (settings.issuer, cache.profile))
    record = login(settings)
    cache.save(record)
    return record


def logged_in_record(args, interactive, now=None):
    """A cache record whose token is valid for ``--min-validity`` more seconds.

    Refreshes or (when ``interactive``) logs in again as needed.
    """
    cache = tokencache.TokenCache(args.profile)
    now = time.time() if now is None else now
    record = cache.load()
    if _fresh(record, args.min_validity, now):
        return record
    with cache.locked():
        record = cache.load()       # someone else may have refreshed it meanwhile
        if _fresh(record, args.min_validity, time.time()):
            return record
        try:
            if record is None:
                raise _not_logged_in(args.profile)
            if not record.get("refresh_token"):
                expiry = record.get("expiry") or 0
                left = expiry - time.time()
                cause = ("the token expired %s ago" % (tokencache.describe_delay(-left),)
                         if left <= 0 else "the token expires in %s"
                         % (tokencache.describe_delay(left),))
                raise _not_logged_in(args.profile, cause + " and there is no refresh token "
                                                           "to renew it")
            return refresh(cache, record, args.config)
        except CommandError as e:
            if not interactive:
                raise
            from arc.cli.login import say
            if record is not None:
                say("arc token: %s" % (e,))
            return login_again(cache, args.config)


def run(args):
    try:
        if args.min_validity < 0:
            raise CommandError("--min-validity must be 0 or more seconds")
        interactive, api_version = exec_info()
        if args.from_file or args.from_env or args.from_command:
            credential = ci_credential(args, api_version)
        else:
            record = logged_in_record(args, interactive)
            credential = exec_credential(record["id_token"], tokencache.jwt_expiry(
                record["id_token"]), api_version)
    except (CommandError, ConfigError) as e:
        # Printed here rather than by arc.cli.main, so that the one-line form
        # also holds under `python -m arc.cli.main` (a second copy of that module).
        print("arc token: %s" % (e,), file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(credential) + "\n")
    sys.stdout.flush()
    return 0

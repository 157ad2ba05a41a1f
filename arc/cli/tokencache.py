"""Login profiles and cached tokens, in the user's arc configuration directory.

Layout (the directory is ``$ARC_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/arc``,
else ``~/.config/arc``; see :func:`arc.cli.paths.config_dir`)::

    login.yaml              profiles: issuer, client_id, ca_file, scopes
    tokens/                 mode 0700
    tokens/PROFILE.json     mode 0600, replaced atomically
    tokens/PROFILE.lock     held while a token is refreshed or a login is saved

A cache file is one JSON object::

    {"version": 1, "issuer": "https://...", "client_id": "arc",
     "id_token": "eyJ...", "refresh_token": "...", "expiry": 1767225600}

``expiry`` is the ID token's ``exp`` (seconds since 1970).  The client
daemon reads ``id_token`` from this file too (``token_cache`` in its
configuration).

``arc token`` reads the cache before every kubectl request, so this module
imports only the standard library; YAML and the file-writing helpers are
imported when they are needed.
"""

import base64
import binascii
import contextlib
import json
import os
import re
import time

from arc.cli.main import CommandError
from arc.cli.paths import config_dir

CONFIG_NAME = "login.yaml"
DEFAULT_PROFILE = "default"
DEFAULT_SCOPES = "openid profile email groups offline_access"
CACHE_VERSION = 1
_PROFILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_profile(name):
    """``name`` if it can name a profile (and a file), else CommandError."""
    if not isinstance(name, str) or not _PROFILE.match(name):
        raise CommandError("profile name %r is not usable: use letters, digits, '.', '_' and "
                           "'-' (at most 64, starting with a letter or digit)" % (name,))
    return name


def config_path(explicit=None, environ=None):
    """The login settings file: ``explicit`` (``--config``), else DIR/login.yaml."""
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    return os.path.join(config_dir(environ), CONFIG_NAME)


def tokens_dir(environ=None):
    return os.path.join(config_dir(environ), "tokens")


def cache_path(profile=DEFAULT_PROFILE, environ=None):
    """Where the tokens of ``profile`` are cached."""
    return os.path.join(tokens_dir(environ), check_profile(profile) + ".json")


# -- JWT payloads (never verified here) -------------------------------------------


def jwt_claims(token):
    """The payload of a compact JWS as a dict, or None if ``token`` is not one.

    Nothing is verified: the relay and the guard verify tokens.  The client
    only reads ``exp`` (and, right after it received a token from the
    identity provider over verified TLS, ``iss``, ``aud`` and ``nonce``).
    """
    if not isinstance(token, str):
        return None
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def jwt_expiry(token):
    """The ``exp`` claim of ``token`` as an int, or None."""
    claims = jwt_claims(token)
    exp = claims.get("exp") if claims else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return int(exp)


def rfc3339(seconds):
    """``2026-01-01T00:00:00Z`` for a time in seconds since 1970."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def describe_delay(seconds):
    """``45 s``, ``12 min``, ``3 h`` (rounded down)."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return "%d s" % (seconds,)
    if seconds < 7200:
        return "%d min" % (seconds // 60,)
    return "%d h" % (seconds // 3600,)


# -- the cache --------------------------------------------------------------------


def new_record(issuer, client_id, id_token, refresh_token):
    """A cache record for a fresh token response."""
    return {"version": CACHE_VERSION, "issuer": issuer, "client_id": client_id,
            "id_token": id_token, "refresh_token": refresh_token,
            "expiry": jwt_expiry(id_token)}


class TokenCache:
    """The cached tokens of one profile."""

    def __init__(self, profile=DEFAULT_PROFILE, environ=None):
        self.profile = check_profile(profile)
        self.path = cache_path(profile, environ)
        self.directory = os.path.dirname(self.path)
        self.lock_path = os.path.join(self.directory, self.profile + ".lock")

    def load(self):
        """The cached record, or None when there is none.

        A file that is not a cache record raises CommandError (with the fix).
        """
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CommandError("cannot read the token cache %s: %s" % (self.path, e.strerror))
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("id_token"), str):
            raise CommandError("the token cache %s is damaged; run \"arc login --profile %s\""
                               % (self.path, self.profile))
        return record

    def _ensure_directory(self):
        # The configuration directory is made private too when arc creates it.
        os.makedirs(os.path.dirname(self.directory), mode=0o700, exist_ok=True)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def save(self, record):
        """Replace the cache atomically (mode 0600 in a 0700 directory)."""
        from arc.pki import write_private

        self._ensure_directory()
        data = json.dumps(record, indent=1, sort_keys=True) + "\n"
        write_private(self.path, data.encode("utf-8"), 0o600)

    def delete(self):
        """Remove the cache (and its lock file); True if there was a cache."""
        existed = os.path.exists(self.path)
        for path in (self.path, self.lock_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return existed

    @contextlib.contextmanager
    def locked(self, timeout=30.0, sleep=time.sleep):
        """Hold the profile's lock, so parallel ``arc token`` runs refresh only once.

        Waits at most ``timeout`` seconds for another holder, then raises
        CommandError.  Without ``fcntl`` (Windows) there is no lock.
        """
        try:
            import fcntl
        except ImportError:
            yield
            return
        self._ensure_directory()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise CommandError(
                            "another arc process has been refreshing the tokens of profile %s "
                            "for %g s (lock %s); let it finish, or stop it and retry"
                            % (self.profile, timeout, self.lock_path)) from None
                    sleep(0.05)
            yield
        finally:
            os.close(fd)


# -- login settings (login.yaml) --------------------------------------------------


class Profile:
    """The login settings of one profile."""

    def __init__(self, name, issuer=None, client_id=None, ca_file=None, scopes=None):
        self.name = name
        self.issuer = issuer
        self.client_id = client_id
        self.ca_file = ca_file
        self.scopes = scopes

    def to_dict(self):
        data = {"issuer": self.issuer, "client_id": self.client_id}
        if self.ca_file:
            data["ca_file"] = self.ca_file
        if self.scopes:
            data["scopes"] = self.scopes
        return data


def _load_yaml(path):
    import yaml

    from arc.config import load

    if not os.path.exists(path):
        return None, yaml
    return load(path), yaml


def load_profile(name, path):
    """The settings of profile ``name`` in ``path``; empty settings if it has none.

    Mistakes in the file raise :class:`~arc.errors.ConfigError` naming the
    file and the key.
    """
    check_profile(name)
    node, _ = _load_yaml(path)
    if node is None:
        return Profile(name)
    entries = dict(node.items("profiles"))
    node.finish()
    entry = entries.get(name)
    if entry is None:
        return Profile(name)
    profile = Profile(name,
                      issuer=entry.get("issuer", str, None),
                      client_id=entry.get("client_id", str, None),
                      ca_file=entry.path("ca_file", None),
                      scopes=entry.get("scopes", str, None))
    entry.finish()
    return profile


def save_profile(profile, path):
    """Add or replace ``profile`` in the settings file ``path`` (atomically)."""
    from arc.pki import write_private

    node, yaml = _load_yaml(path)
    data = dict(node.data) if node is not None else {}
    profiles = dict(data.get("profiles") or {})
    profiles[profile.name] = profile.to_dict()
    data["profiles"] = profiles
    text = ("# arc login profiles; `arc login --profile NAME` adds or updates one.\n"
            + yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    write_private(path, text.encode("utf-8"), 0o600)

"""``arc login`` and ``arc logout``.

``arc login`` gets an ID token (and a refresh token) from an OpenID Connect
provider and caches them for ``arc token`` (see :mod:`arc.cli.tokencache`).
Two ways to log in:

- the browser: authorization code with PKCE (RFC 7636, ``S256``) and a
  loopback redirect to ``http://127.0.0.1:PORT/callback`` (RFC 8252);
- a device code (RFC 8628): open a URL anywhere, type the code shown.

The default is the browser when a display seems available (``$DISPLAY``,
``$WAYLAND_DISPLAY``, ``$BROWSER``, macOS, Windows), else the device code.
After a successful login the settings used are saved as a profile in
``login.yaml``, so ``arc token`` and the next ``arc login --profile NAME``
need no flags.

``arc logout`` deletes the cached tokens of a profile (its settings stay).
"""

import html
import os
import sys
import time
import urllib.parse

from arc.cli import tokencache
from arc.cli.main import CommandError
from arc.errors import ConfigError

CALLBACK_PATH = "/callback"
BROWSER_TIMEOUT = 300.0


def say(text):
    """Talk to the person logging in (stderr: stdout may be kubectl's)."""
    print(text, file=sys.stderr, flush=True)


# -- arguments ------------------------------------------------------------------


def add_common(parser):
    parser.add_argument("--profile", default=tokencache.DEFAULT_PROFILE,
                        help="login profile (default: default)")
    parser.add_argument("--config", help="login settings file (default: "
                                         "$ARC_CONFIG_DIR/login.yaml, else "
                                         "~/.config/arc/login.yaml)")


def add_arguments_login(parser):
    add_common(parser)
    parser.add_argument("--issuer", help="OIDC issuer URL (saved in the profile)")
    parser.add_argument("--client-id", help="OAuth client id (saved in the profile)")
    parser.add_argument("--ca-file", help="CA bundle for the identity provider (saved in the "
                                          "profile; default: the system's trust store)")
    parser.add_argument("--scopes", help="space-separated scopes (saved in the profile; "
                                         "default: %r, less those the provider does not "
                                         "list)" % (tokencache.DEFAULT_SCOPES,))
    flow = parser.add_mutually_exclusive_group()
    flow.add_argument("--device", dest="flow", action="store_const", const="device",
                      help="log in with a device code (no browser on this machine)")
    flow.add_argument("--browser", dest="flow", action="store_const", const="browser",
                      help="log in with a browser (authorization code + PKCE)")
    parser.add_argument("--no-browser", action="store_true",
                        help="browser flow: print the URL, do not open a browser")
    parser.add_argument("--listen-port", type=int, default=0,
                        help="browser flow: loopback port for the redirect (default: any "
                             "free port; set it if the provider allows only one redirect URI)")
    parser.add_argument("--timeout", type=float, default=BROWSER_TIMEOUT,
                        help="browser flow: seconds to wait for the redirect (default 300)")


def add_arguments_logout(parser):
    add_common(parser)


# -- settings -------------------------------------------------------------------


def resolve_profile(args):
    """The profile's saved settings with this run's flags applied; ``(profile, path)``."""
    path = tokencache.config_path(args.config)
    profile = tokencache.load_profile(args.profile, path)
    if getattr(args, "issuer", None):
        profile.issuer = args.issuer
    if getattr(args, "client_id", None):
        profile.client_id = args.client_id
    if getattr(args, "ca_file", None):
        ca_file = os.path.abspath(os.path.expanduser(args.ca_file))
        if not os.path.isfile(ca_file):
            raise CommandError("CA bundle %s does not exist; check --ca-file" % (ca_file,))
        profile.ca_file = ca_file
    if getattr(args, "scopes", None):
        profile.scopes = args.scopes
    return profile, path


def require_settings(profile, path):
    missing = [flag for flag, value in (("--issuer URL", profile.issuer),
                                        ("--client-id ID", profile.client_id)) if not value]
    if missing:
        raise CommandError("profile %s has no %s in %s: run \"arc login --profile %s %s\""
                           % (profile.name, " and no ".join(m.split()[0] for m in missing),
                              path, profile.name, " ".join(missing)))


def display_available(environ=None, platform=None):
    """True when a browser can probably be opened on this machine."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if platform == "darwin" or platform.startswith("win"):
        return True
    return any(environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"))


# -- the loopback redirect ------------------------------------------------------


def render_page(title, text):
    """A minimal HTML page for the browser that came back to the loopback listener."""
    return ("<!doctype html><html><head><meta charset=utf-8><title>%s</title></head>"
            "<body><h1>%s</h1><p>%s</p></body></html>"
            % (html.escape(title), html.escape(title), html.escape(text))).encode("utf-8")


def _callback_handler():
    """The request handler class of the loopback listener (built on first use)."""
    from http.server import BaseHTTPRequestHandler

    class CallbackHandler(BaseHTTPRequestHandler):
        """Takes ``code`` (or ``error``) from a redirect whose ``state`` matches."""

        server_version = "arc-login"
        timeout = 10

        def do_GET(self):
            parts = urllib.parse.urlsplit(self.path)
            if parts.path != CALLBACK_PATH:
                self._reply(404, "Not found", "This is the redirect listener of arc login.")
                return
            query = urllib.parse.parse_qs(parts.query)

            def first(name):
                values = query.get(name)
                return values[0] if values else None

            if first("state") != self.server.expected_state:
                self._reply(400, "Login not accepted",
                            "This answer does not belong to the login under way (state does "
                            "not match). Open the URL printed by arc login.")
                return
            if first("error"):
                self.server.result = {"error": first("error"),
                                      "error_description": first("error_description")}
                self._reply(400, "Login failed", "The identity provider refused the login; "
                                                 "see the terminal.")
                return
            if not first("code"):
                self._reply(400, "Login not accepted", "The redirect carries no code.")
                return
            self.server.result = {"code": first("code")}
            self._reply(200, "Logged in", "arc received the login; you can close this window "
                                          "and return to the terminal.")

        def _reply(self, status, title, text):
            body = render_page(title, text)
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass    # the request line holds the authorization code

    return CallbackHandler


def wait_for_redirect(state, show, *, port=0, timeout=BROWSER_TIMEOUT):
    """Listen on 127.0.0.1:``port`` for the redirect carrying ``state``.

    ``show(redirect_uri)`` is called once listening.  Answers with another
    ``state`` are refused and the wait goes on.  Returns ``{"code": ...,
    "redirect_uri": ...}`` or ``{"error": ..., "error_description": ...}``.
    """
    import socketserver

    from arc.cli.oidcclient import OIDCError

    server = socketserver.TCPServer(("127.0.0.1", port), _callback_handler(),
                                    bind_and_activate=False)
    server.allow_reuse_address = True       # a fixed --listen-port right after a login
    try:
        server.server_bind()
        server.server_activate()
    except OSError as e:
        server.server_close()
        raise CommandError("cannot listen on 127.0.0.1:%d for the login redirect (%s); choose "
                           "another --listen-port" % (port, e.strerror or e)) from None
    with server:
        server.expected_state = state
        server.result = None
        redirect_uri = "http://127.0.0.1:%d%s" % (server.server_address[1], CALLBACK_PATH)
        show(redirect_uri)
        deadline = time.monotonic() + timeout
        while server.result is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OIDCError("no browser came back to %s within %s" % (
                    redirect_uri, tokencache.describe_delay(timeout)))
            server.timeout = min(remaining, 1.0)
            server.handle_request()
        return dict(server.result, redirect_uri=redirect_uri)


# -- the flows ------------------------------------------------------------------


def device_flow(provider, client_id, scopes, *, sleep=time.sleep, clock=time.monotonic):
    """Log in with a device code; ``(token response, None)`` (there is no nonce)."""
    from arc.cli.oidcclient import poll_device

    device = provider.start_device(client_id, scopes)
    say("To log in, open %s and enter the code %s" % (device.verification_uri,
                                                      device.user_code))
    if device.complete_uri:
        say("(or open %s)" % (device.complete_uri,))
    say("Waiting for the login to be approved (up to %s)..."
        % (tokencache.describe_delay(device.expires_in),))
    return poll_device(provider, client_id, device, sleep=sleep, clock=clock), None


def authorization_url(endpoint, client_id, redirect_uri, scopes, state, nonce, challenge):
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
        "scope": scopes, "state": state, "nonce": nonce, "code_challenge": challenge,
        "code_challenge_method": "S256"})
    return endpoint + ("&" if "?" in endpoint else "?") + query


def open_browser(url):
    """Ask a browser to open ``url``, from a child process that is not waited for.

    The login listener must keep serving while the browser runs (a terminal
    browser such as w3m only returns when closed), and under ``arc token``
    stdout belongs to kubectl, so the child writes its output to stderr.
    """
    import subprocess

    try:
        subprocess.Popen([sys.executable, "-c",
                          "import sys, webbrowser; webbrowser.open(sys.argv[1])", url],
                         stdout=2, close_fds=True)
    except OSError:
        pass    # the URL is printed: the person can open it themselves


def browser_flow(provider, client_id, scopes, *, listen_port=0, launch_browser=True,
                 timeout=BROWSER_TIMEOUT):
    """Log in with a browser (authorization code + PKCE); ``(token response, nonce)``."""
    import secrets

    from arc.cli.oidcclient import OIDCError, pkce_pair

    endpoint = provider.require("authorization_endpoint", "the authorization code grant")
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(24)
    nonce = secrets.token_urlsafe(24)

    def show(redirect_uri):
        url = authorization_url(endpoint, client_id, redirect_uri, scopes, state, nonce,
                                challenge)
        say("To log in, open this URL in a browser:\n\n    %s\n" % (url,))
        if launch_browser:
            open_browser(url)
        say("Waiting for the browser to come back to %s (up to %s)..."
            % (redirect_uri, tokencache.describe_delay(timeout)))

    result = wait_for_redirect(state, show, port=listen_port, timeout=timeout)
    if result.get("error"):
        description = result.get("error_description")
        raise OIDCError("the identity provider refused the login (%s%s)"
                        % (result["error"], ": " + description[:200] if description else ""))
    answer = provider.exchange_code(client_id, result["code"], result["redirect_uri"], verifier)
    return answer, nonce


def login(profile, *, flow=None, launch_browser=True, listen_port=0,
          timeout=BROWSER_TIMEOUT, sleep=time.sleep, clock=time.monotonic):
    """Log in with ``profile``'s settings; the cache record to save.

    Raises CommandError naming the cause and the fix.
    """
    from arc.cli.oidcclient import OIDCError, Provider

    try:
        provider = Provider(profile.issuer, ca_file=profile.ca_file)
        scopes = profile.scopes or provider.default_scopes(tokencache.DEFAULT_SCOPES)
        if flow is None:
            can_browse = provider.endpoint("authorization_endpoint") is not None
            can_device = provider.endpoint("device_authorization_endpoint") is not None
            flow = "browser" if can_browse and (display_available() or not can_device) \
                else "device"
        if flow == "device":
            answer, nonce = device_flow(provider, profile.client_id, scopes, sleep=sleep,
                                        clock=clock)
        else:
            answer, nonce = browser_flow(provider, profile.client_id, scopes,
                                         listen_port=listen_port,
                                         launch_browser=launch_browser, timeout=timeout)
        id_token = provider.check_id_token(answer, profile.client_id, nonce)
    except OIDCError as e:
        raise CommandError("%s; fix that and run \"arc login --profile %s\" again"
                           % (e, profile.name)) from None
    refresh_token = answer.get("refresh_token")
    return tokencache.new_record(profile.issuer, profile.client_id, id_token,
                                 refresh_token if isinstance(refresh_token, str) else None)


def who(record):
    """``alice@example.com (groups: dev, ops)``: who a cached ID token names."""
    claims = tokencache.jwt_claims(record["id_token"]) or {}
    name = claims.get("email") or claims.get("preferred_username") or claims.get("sub") or "?"
    groups = claims.get("groups")
    if isinstance(groups, list) and groups:
        return "%s (groups: %s)" % (name, ", ".join(str(g) for g in groups[:10]))
    return str(name)


# -- commands -------------------------------------------------------------------


def _one_line(command, body, args):
    """Run ``body(args)``; a CommandError or ConfigError becomes one line on stderr.

    Done here as well as in :mod:`arc.cli.main` so that the one-line form also
    holds under ``python -m arc.cli.main`` (where that module is loaded twice).
    """
    try:
        return body(args)
    except (CommandError, ConfigError) as e:
        print("arc %s: %s" % (command, e), file=sys.stderr)
        return 1


def _login(args):
    profile, path = resolve_profile(args)
    require_settings(profile, path)
    if not 0 <= args.listen_port <= 65535:
        raise CommandError("--listen-port %d is not a port (0-65535)" % (args.listen_port,))
    record = login(profile, flow=args.flow, launch_browser=not args.no_browser,
                   listen_port=args.listen_port, timeout=args.timeout)
    cache = tokencache.TokenCache(profile.name)
    with cache.locked():
        cache.save(record)
    tokencache.save_profile(profile, path)
    expiry = record.get("expiry")
    until = ""
    if expiry:
        until = "; the token is valid for %s" % (tokencache.describe_delay(expiry - time.time()),)
        if record.get("refresh_token"):
            until += " and renewed by arc token"
    print("Logged in to %s as %s%s.\nTokens cached in %s (profile %s)."
          % (profile.issuer, who(record), until, cache.path, profile.name))
    return 0


def _logout(args):
    cache = tokencache.TokenCache(args.profile)
    if cache.delete():
        print("Deleted the cached tokens of profile %s (%s); its settings stay in %s."
              % (cache.profile, cache.path, tokencache.config_path(args.config)))
    else:
        print("No cached tokens for profile %s (%s): nothing to delete."
              % (cache.profile, cache.path))
    return 0


def run_login(args):
    return _one_line("login", _login, args)


def run_logout(args):
    return _one_line("logout", _logout, args)

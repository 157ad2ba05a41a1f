"""The relay's status page for operators: ``GET /arc/v1/status`` on its main port.

Configured by the relay's ``status:`` section::

    status:
      token_sha256: HEX   # SHA-256 of the operators' status token (`arc hash-token`)

Without it both paths answer 404.  ``/arc/v1/status`` is an HTML page (a
table of clusters with their agents, active streams per user, bytes, and
the recent refusals and resets) that refreshes itself every 2 s from
``/arc/v1/status.json``, which carries the same data for scripts.  The
page loads no external asset; its inline style and script carry a
per-response nonce that its Content-Security-Policy names, and every value
is inserted as text, never as markup.

Who may look: a request with ``Authorization: Bearer TOKEN`` (scripts,
curl), or a browser holding the session cookie.  A browser cannot send a
bearer header when it loads a page, so the token is accepted once as
``?token=TOKEN``: the relay answers with a redirect to the same path
without the query and sets a cookie holding a random session id (not the
token), ``HttpOnly; Secure; SameSite=Strict``, valid for 12 hours or until
the relay restarts.  The token then appears in no later request, in no
``Referer`` and not in the address bar.

The relay's listener reads request heads only, so the page is served from
:meth:`StatusPage.plain`, which decorates the relay's own ``plain``
handler (health checks and 404s stay the relay's).
"""

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from twisted.logger import Logger

STATUS_PATH = "/arc/v1/status"
STATUS_JSON_PATH = "/arc/v1/status.json"
COOKIE = "arc_status"
COOKIE_PATH = "/arc/v1/"
SESSION_TTL = 12 * 3600
MAX_SESSIONS = 64
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StatusSettings:
    token_sha256: str


def parse_status(node):
    """The relay's optional ``status:`` section; None (page off) when absent."""
    section = node.section("status")
    if not section.has("token_sha256"):
        section.finish()
        return None
    digest = section.get("token_sha256", str).lower()
    if not _HEX64.match(digest):
        raise section.error("token_sha256", "must be the hex SHA-256 of the status token (64 "
                                            "hex digits; `arc hash-token` prints it)")
    section.finish()
    return StatusSettings(digest)


def _response(status, reason, headers, body, head_only=False):
    lines = ["HTTP/1.1 %d %s" % (status, reason),
             "Content-Length: %d" % (len(body),),
             "Connection: close",
             "Cache-Control: no-store",
             "Referrer-Policy: no-referrer",
             "X-Content-Type-Options: nosniff"]
    lines.extend("%s: %s" % h for h in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


def _json_body(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def _cookies(request):
    found = {}
    for part in (request.header("cookie") or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name and name not in found:
            found[name] = value
    return found


class StatusPage:
    """Serves the status paths of the relay's plain handler; the rest goes to ``fallback``.

    :param watch: the :class:`~arc.ops.relaywatch.RelayWatch` to show.
    :param settings: :class:`StatusSettings`, or None (the page is off).
    :param walltime: session expiry clock.
    """

    log = Logger()

    def __init__(self, watch, settings, fallback, *, walltime=time.time,
                 new_session=lambda: secrets.token_urlsafe(32)):
        self.watch = watch
        self.settings = settings
        self.fallback = fallback
        self.walltime = walltime
        self.new_session = new_session
        self.sessions = {}     # session id -> expiry (walltime)

    def plain(self, request):
        path, _, query = request.path.partition("?")
        if path not in (STATUS_PATH, STATUS_JSON_PATH):
            return self.fallback(request)
        head_only = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            return _response(405, "Method Not Allowed", [("Allow", "GET, HEAD"),
                             ("Content-Type", "application/json")],
                             _json_body({"message": "the status page answers GET only"}))
        if self.settings is None:
            return _response(404, "Not Found", [("Content-Type", "application/json")],
                             _json_body({"message": "the status page is off: set "
                                                    "status.token_sha256 in the relay "
                                                    "configuration"}), head_only)
        tokens = parse_qs(query).get("token")
        if tokens:
            return self._login(request, path, tokens[0], head_only)
        if not self._authorized(request):
            return self._unauthorized(path, head_only)
        if path == STATUS_JSON_PATH:
            return _response(200, "OK", [("Content-Type", "application/json")],
                             _json_body(self.watch.snapshot()), head_only)
        nonce = secrets.token_urlsafe(16)
        return _response(200, "OK", [("Content-Type", "text/html; charset=utf-8"),
                                     ("Content-Security-Policy", _csp(nonce)),
                                     ("X-Frame-Options", "DENY")],
                         render_page(self.watch.snapshot(), nonce), head_only)

    # -- who may look ------------------------------------------------------------------

    def _token_ok(self, token):
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        return hmac.compare_digest(digest, self.settings.token_sha256)

    def _authorized(self, request):
        token = request.bearer()
        if token is not None:
            return self._token_ok(token)
        session = _cookies(request).get(COOKIE)
        if not session:
            return False
        expiry = self.sessions.get(session)
        if expiry is None:
            return False
        if expiry <= self.walltime():
            del self.sessions[session]
            return False
        return True

    def _login(self, request, path, token, head_only):
        if not self._token_ok(token):
            peer = getattr(request.peer, "host", "") or str(request.peer)
            self.log.warn("status page: wrong token in a login from {peer}", peer=peer)
            self.watch.note("status login refused", "wrong status token", peer=peer)
            return _response(401, "Unauthorized", [("Content-Type", "text/plain; charset=utf-8")],
                             b"status token rejected\n", head_only)
        now = self.walltime()
        for sid, expiry in list(self.sessions.items()):
            if expiry <= now:
                del self.sessions[sid]
        while len(self.sessions) >= MAX_SESSIONS:
            del self.sessions[min(self.sessions, key=self.sessions.get)]
        session = self.new_session()
        self.sessions[session] = now + SESSION_TTL
        cookie = ("%s=%s; Path=%s; Max-Age=%d; HttpOnly; Secure; SameSite=Strict"
                  % (COOKIE, session, COOKIE_PATH, SESSION_TTL))
        return _response(303, "See Other", [("Location", path), ("Set-Cookie", cookie),
                                           ("Content-Type", "text/plain; charset=utf-8")],
                         b"signed in; continue at " + path.encode() + b"\n", head_only)

    def _unauthorized(self, path, head_only):
        headers = [("WWW-Authenticate", 'Bearer realm="arc relay status"')]
        if path == STATUS_JSON_PATH:
            return _response(401, "Unauthorized", headers + [("Content-Type", "application/json")],
                             _json_body({"message": "send Authorization: Bearer STATUS_TOKEN, "
                                                    "or sign in at %s?token=STATUS_TOKEN"
                                                    % (STATUS_PATH,)}), head_only)
        body = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<title>arc relay status: sign in</title></head><body><p>Open "
                "<code>%s?token=STATUS_TOKEN</code> once: the relay sets a session cookie "
                "and takes the token out of the address.</p></body></html>" % (STATUS_PATH,))
        return _response(401, "Unauthorized",
                         headers + [("Content-Type", "text/html; charset=utf-8"),
                                    ("Content-Security-Policy", "default-src 'none'")],
                         body.encode(), head_only)


def _csp(nonce):
    return ("default-src 'none'; script-src 'nonce-%s'; style-src 'nonce-%s'; "
            "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'" % (nonce, nonce))


def _embed(data):
    """JSON safe inside a <script> element (no markup can end it early)."""
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(snapshot, nonce):
    """The page: static markup, the snapshot as JSON, a script that renders and polls it."""
    return (_PAGE.replace("{NONCE}", nonce)
            .replace("{JSON_PATH}", STATUS_JSON_PATH)
            .replace("{DATA}", _embed(snapshot))
            .encode("utf-8"))


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>arc relay status</title>
<style nonce="{NONCE}">
:root { color-scheme: light; --line: #d8dde3; --muted: #5b6672; --bad: #b3261e; --ok: #1b7f3b; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2329;
       background: #f6f7f9; }
header { display: flex; align-items: baseline; gap: 1.5em; padding: 14px 24px; background: #17324d;
         color: #fff; }
header h1 { font-size: 18px; margin: 0; }
header .muted { color: #c5d3e0; }
main { padding: 8px 24px 24px; }
h2 { font-size: 15px; margin: 20px 0 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.empty { color: var(--muted); font-style: italic; }
.offline { color: var(--bad); font-weight: 600; }
.online { color: var(--ok); font-weight: 600; }
.muted { color: var(--muted); }
#updated.stale { color: #ffb4ab; }
td.reason { word-break: break-word; }
</style>
</head>
<body data-refreshes="0">
<header>
  <h1>arc relay</h1>
  <span id="summary" class="muted"></span>
  <span id="updated" class="muted"></span>
</header>
<main>
<h2>Clusters and agents</h2>
<table id="clusters">
<thead><tr><th>Cluster</th><th class="num">Agents</th><th>Agent peer</th><th>Version</th>
<th>Connected since (UTC)</th><th class="num">Last ping RTT</th><th class="num">Streams open</th>
<th class="num">Streams opened</th><th class="num">Bytes client&#160;&#8594;&#160;agent</th>
<th class="num">Bytes agent&#160;&#8594;&#160;client</th></tr></thead>
<tbody></tbody>
</table>
<h2>Active streams per user</h2>
<table id="users">
<thead><tr><th>User</th><th>Cluster</th><th class="num">Streams open</th><th class="num">Bytes</th>
<th>Oldest open since (UTC)</th></tr></thead>
<tbody></tbody>
</table>
<h2>Recent errors (refusals, resets, lost agent tunnels; newest first)</h2>
<table id="errors">
<thead><tr><th>Time (UTC)</th><th>What</th><th>Cluster</th><th>User</th><th>Peer</th><th>Code</th>
<th>Reason</th></tr></thead>
<tbody></tbody>
</table>
<noscript><p>This page renders and refreshes with JavaScript; {JSON_PATH} carries the same
data.</p></noscript>
</main>
<script type="application/json" id="initial">{DATA}</script>
<script nonce="{NONCE}">
(function () {
  "use strict";
  var refreshes = 0;

  function cell(row, value, field, cls) {
    var td = document.createElement("td");
    td.textContent = value === null || value === undefined ? "" : String(value);
    if (field) { td.setAttribute("data-field", field); }
    if (cls) { td.className = cls; }
    row.appendChild(td);
    return td;
  }
  function bytes(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function utc(t) {
    if (t === null || t === undefined) { return ""; }
    return new Date(t * 1000).toISOString().replace("T", " ").replace(/\\.\\d+Z$/, "");
  }
  function span(seconds) {
    var s = Math.max(0, Math.round(seconds));
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
    var m = Math.floor(s % 3600 / 60), r = s % 60;
    if (d) { return d + "d " + h + "h"; }
    if (h) { return h + "h " + m + "m"; }
    if (m) { return m + "m " + r + "s"; }
    return r + "s";
  }
  function since(t, now) { return t ? utc(t) + " (" + span(now - t) + ")" : ""; }
  function fill(id, rows, columns, none) {
    var body = document.getElementById(id).tBodies[0];
    while (body.firstChild) { body.removeChild(body.firstChild); }
    if (!rows.length) {
      var row = document.createElement("tr");
      cell(row, none, null, "empty").colSpan = columns;
      body.appendChild(row);
    }
    rows.forEach(function (row) { body.appendChild(row); });
  }

  function clusterRows(c, now) {
    var rows = [], agents = c.agents.length ? c.agents : [null];
    agents.forEach(function (a, i) {
      var row = document.createElement("tr");
      row.setAttribute("data-cluster", c.name);
      if (i === 0) {
        var span0 = agents.length;
        cell(row, c.name + (c.registered ? "" : " (removed)"), "name").rowSpan = span0;
        cell(row, c.agents.length, "agents", "num " + (c.agents.length ? "online" : "offline"))
          .rowSpan = span0;
      }
      if (a) {
        cell(row, a.peer, "peer");
        cell(row, a.version || "unknown", "version");
        cell(row, since(a.since, now) + (a.draining ? " draining" : ""), "since");
        if (a.rtt_ms === null) {
          cell(row, "no ping yet", "rtt", "num muted");
        } else {
          cell(row, a.rtt_ms.toFixed(1) + " ms", "rtt", "num");
        }
      } else {
        cell(row, "offline: no agent connected", "peer", "offline").colSpan = 4;
      }
      if (i === 0) {
        [["streams_open", c.streams_open], ["streams_opened", c.streams_opened],
         ["bytes_client_to_agent", bytes(c.bytes_client_to_agent)],
         ["bytes_agent_to_client", bytes(c.bytes_agent_to_client)]].forEach(function (f) {
          cell(row, f[1], f[0], "num").rowSpan = agents.length;
        });
      }
      rows.push(row);
    });
    return rows;
  }

  function render(d) {
    var now = d.relay.now, rows = [];
    document.getElementById("summary").textContent =
      "version " + d.relay.version + ", up " + span(now - d.relay.started) + ", " +
      d.relay.agent_tunnels + " agent tunnels, " + d.relay.client_tunnels +
      " client tunnels, " + d.relay.streams_open + " streams open";
    d.clusters.forEach(function (c) { rows = rows.concat(clusterRows(c, now)); });
    fill("clusters", rows, 10, "no cluster is registered");
    fill("users", d.users.map(function (u) {
      var row = document.createElement("tr");
      row.setAttribute("data-user", u.user);
      row.setAttribute("data-cluster", u.cluster);
      cell(row, u.user, "user");
      cell(row, u.cluster, "cluster");
      cell(row, u.streams_open, "streams_open", "num");
      cell(row, bytes(u.bytes), "bytes", "num");
      cell(row, since(u.oldest, now), "oldest");
      return row;
    }), 5, "no active stream");
    fill("errors", d.errors.map(function (e) {
      var row = document.createElement("tr");
      cell(row, utc(e.time), "time");
      cell(row, e.what + (e.count > 1 ? " (\u00d7" + e.count + ")" : ""), "what");
      cell(row, e.cluster, "cluster");
      cell(row, e.user, "user");
      cell(row, e.peer, "peer");
      cell(row, e.code, "code");
      cell(row, e.reason, "reason", "reason");
      return row;
    }), 7, "none recorded");
    var updated = document.getElementById("updated");
    updated.className = "muted";
    updated.textContent = "as of " + utc(now) + " UTC, refreshed every 2 s";
  }

  function stale(message) {
    var updated = document.getElementById("updated");
    updated.className = "stale";
    updated.textContent = "refresh failed (" + message + "); showing older data";
  }

  function poll() {
    fetch("{JSON_PATH}", {credentials: "same-origin", cache: "no-store"})
      .then(function (r) {
        if (r.status === 401) {
          throw new Error("session expired: open the page with ?token= again");
        }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (d) {
        refreshes += 1;
        document.body.setAttribute("data-refreshes", String(refreshes));
        render(d);
      })
      .catch(function (e) { stale(e.message); });
  }

  render(JSON.parse(document.getElementById("initial").textContent));
  setInterval(poll, 2000);
}());
</script>
</body>
</html>
"""

"""Tests for arc.ops.statuspage: who may look, what is served, and the page in Chromium.

The browser test starts the API emulator, the relay, an agent and a client
as real processes, keeps a ``kubectl get pods -w`` stream open, then loads
``/arc/v1/status?token=...`` in headless Chromium: the relay answers with a
redirect that sets the session cookie, the page renders from its embedded
JSON and polls ``/arc/v1/status.json`` every 2 s.  The DOM Chromium dumps
is checked against the relay's own state, and a screenshot is kept in the
test's temporary directory.
"""

import hashlib
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess

from twisted.internet.address import IPv4Address
from twisted.trial import unittest

from arc import __version__
from arc.ops.statuspage import (COOKIE, SESSION_TTL, STATUS_JSON_PATH, STATUS_PATH,
                                StatusPage, StatusSettings, parse_status)
from arc.tunnel.carrier import TunnelRequest
from tests.chain import wait_for
from tests.opschain import OpsChain
from tests.test_integration import ChainMixin

TOKEN = "status-token-0123456789abcdef"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class FakeWatch:
    def __init__(self):
        self.notes = []
        self.data = {"relay": {"version": "0.1.0", "started": 0, "now": 60, "agent_tunnels": 0,
                               "client_tunnels": 0, "streams_open": 0},
                     "clusters": [], "users": [],
                     "errors": [{"time": 1, "what": "stream refused", "count": 1,
                                 "reason": "cluster '</script><script>alert(1)</script>' "
                                           "is not registered & <b>"}]}

    def snapshot(self):
        return self.data

    def note(self, what, reason, **kw):
        self.notes.append((what, reason, kw))


def req(path, method="GET", token=None, cookie=None):
    headers = []
    if token is not None:
        headers.append(("authorization", "Bearer " + token))
    if cookie is not None:
        headers.append(("cookie", cookie))
    return TunnelRequest(method, path, headers, IPv4Address("TCP", "192.0.2.7", 50000))


def parse(raw):
    """``(status, {lower-case header: [values]}, body)`` of a raw HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


class StatusPageTests(unittest.TestCase):
    def setUp(self):
        self.now = [1000.0]
        self.watch = FakeWatch()
        self.fallback = []
        self.page = StatusPage(self.watch, StatusSettings(hashlib.sha256(TOKEN.encode())
                                                          .hexdigest()),
                               lambda r: self.fallback.append(r) or b"fallback",
                               walltime=lambda: self.now[0])

    def login(self, path=STATUS_PATH):
        status, headers, _ = parse(self.page.plain(req(path + "?token=" + TOKEN)))
        self.assertEqual(status, 303)
        return headers

    def test_other_paths_go_to_the_relays_own_handler(self):
        self.assertEqual(self.page.plain(req("/healthz")), b"fallback")
        self.assertEqual(self.page.plain(req("/arc/v1/statusx")), b"fallback")
        self.assertEqual(len(self.fallback), 2)

    def test_off_without_a_status_section(self):
        page = StatusPage(self.watch, None, lambda r: b"")
        status, _, body = parse(page.plain(req(STATUS_PATH, token=TOKEN)))
        self.assertEqual(status, 404)
        self.assertIn(b"status.token_sha256", body)

    def test_nothing_without_a_credential(self):
        for path in (STATUS_PATH, STATUS_JSON_PATH):
            status, headers, body = parse(self.page.plain(req(path)))
            self.assertEqual(status, 401)
            self.assertNotIn(b"stream refused", body)
            self.assertEqual(headers["www-authenticate"], ['Bearer realm="arc relay status"'])
        for wrong in ("nope", TOKEN + "x"):
            self.assertEqual(parse(self.page.plain(req(STATUS_JSON_PATH, token=wrong)))[0], 401)
            self.assertEqual(parse(self.page.plain(req(STATUS_PATH,
                                                       cookie=COOKIE + "=" + wrong)))[0], 401)

    def test_bearer_token_for_scripts(self):
        status, headers, body = parse(self.page.plain(req(STATUS_JSON_PATH, token=TOKEN)))
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["application/json"])
        self.assertEqual(headers["cache-control"], ["no-store"])
        self.assertEqual(json.loads(body), self.watch.data)

    def test_token_in_the_query_becomes_a_session_cookie_and_leaves_the_address(self):
        headers = self.login()
        self.assertEqual(headers["location"], [STATUS_PATH])
        [cookie] = headers["set-cookie"]
        attributes = [part.strip() for part in cookie.split(";")]
        name, _, session = attributes[0].partition("=")
        self.assertEqual(name, COOKIE)
        self.assertNotIn(TOKEN, cookie)
        self.assertGreaterEqual(len(session), 40)
        for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/arc/v1/",
                     "Max-Age=%d" % SESSION_TTL):
            self.assertIn(flag, attributes)
        self.assertEqual(headers["referrer-policy"], ["no-referrer"])
        for path in (STATUS_PATH, STATUS_JSON_PATH):
            self.assertEqual(parse(self.page.plain(req(path, cookie="a=b; %s=%s"
                                                       % (COOKIE, session))))[0], 200)
        # The session ends after its lifetime.
        self.now[0] += SESSION_TTL + 1
        self.assertEqual(parse(self.page.plain(req(STATUS_JSON_PATH, cookie=attributes[0])))[0],
                         401)
        self.assertEqual(self.page.sessions, {})

    def test_a_wrong_token_in_the_query_is_refused_and_recorded_without_it(self):
        status, headers, _ = parse(self.page.plain(req(STATUS_PATH + "?token=guess")))
        self.assertEqual(status, 401)
        self.assertNotIn("set-cookie", headers)
        [(what, reason, fields)] = self.watch.notes
        self.assertEqual(what, "status login refused")
        self.assertNotIn("guess", reason + json.dumps(fields))

    def test_sessions_are_bounded(self):
        for _ in range(100):
            self.login()
        self.assertEqual(len(self.page.sessions), 64)

    def test_page_is_self_contained_and_escapes_the_data(self):
        status, headers, body = parse(self.page.plain(req(STATUS_PATH, token=TOKEN)))
        self.assertEqual(status, 200)
        [csp] = headers["content-security-policy"]
        nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
        self.assertIn("default-src 'none'", csp)
        self.assertIn("frame-ancestors 'none'", csp)
        text = body.decode()
        self.assertEqual(text.count('<script nonce="%s">' % nonce), 1)
        self.assertEqual(text.count('<style nonce="%s">' % nonce), 1)
        # No external asset, and the data cannot end its script element.
        self.assertNotRegex(text, r"(src|href)=\"?(https?:)?//")
        self.assertEqual(text.count("</script>"), 2)
        self.assertIn("\\u003c/script\\u003e", text)
        self.assertIn("\\u0026 \\u003cb\\u003e", text)
        # Every response gets a fresh nonce.
        _, again, _ = parse(self.page.plain(req(STATUS_PATH, token=TOKEN)))
        self.assertNotEqual(again["content-security-policy"], [csp])

    def test_get_and_head_only(self):
        status, headers, _ = parse(self.page.plain(req(STATUS_PATH, "POST", token=TOKEN)))
        self.assertEqual(status, 405)
        self.assertEqual(headers["allow"], ["GET, HEAD"])
        status, headers, body = parse(self.page.plain(req(STATUS_JSON_PATH, "HEAD",
                                                          token=TOKEN)))
        self.assertEqual(status, 200)
        self.assertEqual(body, b"")
        self.assertGreater(int(headers["content-length"][0]), 0)


class ParseStatusTests(unittest.TestCase):
    def node(self, data):
        from arc.config import Node
        return Node(data, "/etc/arc/relay.yaml")

    def test_absent_or_empty_is_off(self):
        self.assertIsNone(parse_status(self.node({})))
        self.assertIsNone(parse_status(self.node({"status": {}})))

    def test_digest(self):
        digest = "AB" * 32
        self.assertEqual(parse_status(self.node({"status": {"token_sha256": digest}})),
                         StatusSettings(digest.lower()))

    def test_mistakes_name_the_key(self):
        from arc.errors import ConfigError
        for section, key in (({"token_sha256": "abc"}, "status.token_sha256"),
                             ({"token": "secret"}, "status.token")):
            with self.assertRaises(ConfigError) as caught:
                parse_status(self.node({"status": section}))
            self.assertEqual(caught.exception.key, key)


# -- the page in a real browser -----------------------------------------------------------


def find_browser():
    """The Chromium binary; installed with apt-get when missing (root only)."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    detail = "no apt-get here"
    if shutil.which("apt-get"):
        if os.geteuid() != 0:
            detail = "not root, so apt-get cannot install it"
        else:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            done = subprocess.run("apt-get update -qq && apt-get install -y -qq chromium",
                                  shell=True, capture_output=True, text=True, env=env,
                                  timeout=900)
            found = shutil.which("chromium")
            if found:
                return found
            detail = "apt-get install chromium failed: %s" % (done.stdout + done.stderr)[-600:]
    raise AssertionError("the status page test needs Chromium (tried %s): %s; install it "
                         "(Debian: apt-get install chromium) and run the test again"
                         % (", ".join(BROWSERS), detail))


class Rows(html.parser.HTMLParser):
    """Table rows of a dumped DOM: ``(table id, tr attributes, {data-field: text})``."""

    def __init__(self):
        super().__init__()
        self.rows = []
        self.body = {}
        self._table = None
        self._row = None
        self._field = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr":
            self._row = (attrs, {})
            self.rows.append((self._table,) + self._row)
        elif tag == "td" and self._row is not None:
            self._field = attrs.get("data-field")
            if self._field:
                self._row[1][self._field] = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self._field = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None and self._field:
            self._row[1][self._field] += data

    def find(self, table, **attrs):
        return [fields for tid, tr, fields in self.rows
                if tid == table and all(tr.get("data-" + k) == v for k, v in attrs.items())]


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError("%s is not a PNG" % (path,))
    return struct.unpack(">II", head[16:24])


class StatusPageInChromiumTests(ChainMixin, unittest.TestCase):
    """One chain for the class: started by the first test, stopped after the last."""

    @classmethod
    def make_chain(cls, base):
        return OpsChain(base, extra_clusters=("offline",),
                        tunnel={"ping_interval": 1.0, "dead_after": 10.0})

    def setUp(self):
        self.browser = find_browser()
        super().setUp()
        self.artifacts = os.path.abspath(self.mktemp())
        os.makedirs(self.artifacts)

    def chromium(self, *args):
        argv = [self.browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--user-data-dir=" + os.path.join(self.base, "chromium-profile"),
                "--ignore-certificate-errors", "--virtual-time-budget=5000"] + list(args)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise AssertionError("chromium failed (%d): %s" % (done.returncode,
                                                               done.stderr[-2000:]))
        return done.stdout

    def test_the_page_shows_the_relays_state_and_refreshes(self):
        chain = self.chain
        chain.kubectl("get", "pods")
        chain.kubectl("--context", "offline", "get", "pods", check=False)
        watch = chain.kubectl_background("get", "pods", "-w")
        self.addCleanup(lambda: (watch.kill(), watch.wait()))

        def settled():
            state = chain.status_json()
            demo = state["clusters"][0]
            ready = (any(u["user"] == "demo-user" and u["streams_open"] for u in state["users"])
                     and demo["agents"] and demo["agents"][0]["rtt_ms"] is not None)
            return state if ready else None

        state = wait_for(settled, 30, "the watch stream and a ping answer at the relay")
        url = chain.relay_url(STATUS_PATH + "?token=" + chain.status_token)

        dom = self.chromium("--dump-dom", url)
        with open(os.path.join(self.artifacts, "status-dom.html"), "w") as f:
            f.write(dom)
        rows = Rows()
        rows.feed(dom)
        self.assertNotIn(chain.status_token, dom)
        # The script rendered the table and polled status.json at least once.
        self.assertGreaterEqual(int(rows.body.get("data-refreshes", "0")), 1, dom[-3000:])

        [demo_state, offline_state] = state["clusters"]
        [agent] = demo_state["agents"]
        [demo] = rows.find("clusters", cluster="demo")
        self.assertEqual(demo["name"], "demo")
        self.assertEqual(demo["agents"], "1")
        self.assertEqual(demo["peer"], agent["peer"])
        self.assertEqual(demo["version"], __version__)
        self.assertRegex(demo["since"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(")
        self.assertRegex(demo["rtt"], r"^\d+\.\d ms$")
        self.assertGreaterEqual(int(demo["streams_open"]), 1)
        self.assertGreaterEqual(int(demo["streams_opened"]), demo_state["streams_opened"])
        [offline] = rows.find("clusters", cluster="offline")
        self.assertEqual(offline["agents"], "0")
        self.assertIn("offline", offline["peer"])
        [user] = rows.find("users", user="demo-user", cluster="demo")
        self.assertGreaterEqual(int(user["streams_open"]), 1)
        refused = [f for f in rows.find("errors") if f.get("code") == "CLUSTER_OFFLINE"]
        self.assertTrue(refused, "no CLUSTER_OFFLINE refusal among the recent errors")
        self.assertEqual(refused[0]["user"], "demo-user")

        shot = os.path.join(self.artifacts, "relay-status.png")
        self.chromium("--screenshot=" + shot, "--window-size=1280,800", url)
        self.assertEqual(png_size(shot), (1280, 800))
        self.assertGreater(os.path.getsize(shot), 10000)
        print("\nstatus page screenshot: %s" % (shot,))

    def test_the_relay_redirects_the_login_and_takes_the_cookie(self):
        chain = self.chain
        status, headers, _ = chain.relay_get(STATUS_PATH + "?token=" + chain.status_token)
        self.assertEqual(status, 303)
        self.assertEqual(headers["Location"], STATUS_PATH)
        cookie = headers["Set-Cookie"].split(";")[0]
        status, headers, body = chain.relay_get(STATUS_JSON_PATH, {"Cookie": cookie})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["clusters"][0]["name"], "demo")
        status, _, _ = chain.relay_get(STATUS_JSON_PATH)
        self.assertEqual(status, 401)
        status, _, _ = chain.relay_get(STATUS_PATH + "?token=wrong")
        self.assertEqual(status, 401)
        wait_for(lambda: any(e["what"] == "status login refused"
                             for e in chain.status_json()["errors"]), 5,
                 "the refused login among the recent errors")
        # The relay's own health check is untouched.
        status, _, body = chain.relay_get("/healthz")
        self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))

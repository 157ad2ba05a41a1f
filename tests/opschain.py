"""The integration chain with the operations sections switched on.

Every part gets ``metrics: {listen: ...}`` on a free loopback port, and the
relay a ``status:`` section with a fresh token.  Helpers scrape and parse
``/metrics`` and read the relay's status paths over its TLS port.
"""

import json
import os
import secrets
import ssl
import urllib.error
import urllib.request

import yaml
from prometheus_client.parser import text_string_to_metric_families

from arc.relay.registry import token_digest
from arc.testing.procs import free_port
from tests.chain import Chain


class OpsChain(Chain):
    """A :class:`~tests.chain.Chain` whose parts serve metrics; the relay a status page."""

    def __init__(self, base, **kw):
        super().__init__(base, **kw)
        self.metrics_ports = {name: free_port() for name in ("relay", "agent", "client")}
        self.status_token = secrets.token_urlsafe(24)
        self._configured = False

    def start_relay(self):
        if not self._configured:
            self._configured = True
            self._configure()
        super().start_relay()

    def _configure(self):
        def metrics(part):
            return {"listen": "tcp:%d:interface=127.0.0.1" % self.metrics_ports[part]}

        def relay(data):
            data["metrics"] = metrics("relay")
            data["status"] = {"token_sha256": token_digest(self.status_token)}

        self._rewrite(self.files.relay_config, relay)
        self._rewrite(self.files.agent_config, lambda d: d.update(metrics=metrics("agent")))
        self._rewrite(self.files.client_config, lambda d: d.update(metrics=metrics("client")))

    @staticmethod
    def _rewrite(path, change):
        with open(path) as f:
            data = yaml.safe_load(f)
        change(data)
        with open(path, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)

    # -- reading what the parts serve -----------------------------------------------------

    def get(self, part, path, timeout=5):
        """``(status, body text)`` of a GET on a part's metrics listener."""
        url = "http://127.0.0.1:%d%s" % (self.metrics_ports[part], path)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self, part):
        """``{(sample name, ((label, value), ...)): value}`` from a part's /metrics."""
        status, text = self.get(part, "/metrics")
        if status != 200:
            raise AssertionError("%s /metrics answered %d: %s" % (part, status, text))
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def relay_url(self, path):
        return "https://127.0.0.1:%d%s" % (self.files.relay_port, path)

    def relay_get(self, path, headers=None):
        """``(status, headers, body bytes)`` of a GET on the relay's main (TLS) port."""
        context = ssl.create_default_context(cafile=os.path.join(self.files.state_dir,
                                                                 "relay-ca.crt"))
        request = urllib.request.Request(self.relay_url(path), headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                             _NoRedirect())
        try:
            with opener.open(request, timeout=10) as answer:
                return answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def status_json(self):
        status, _, body = self.relay_get("/arc/v1/status.json", {
            "Authorization": "Bearer " + self.status_token})
        if status != 200:
            raise AssertionError("status.json answered %d: %r" % (status, body))
        return json.loads(body)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):
        return None


def value(samples, name, **labels):
    """One sample's value (0 when absent: counters not yet moved)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0)

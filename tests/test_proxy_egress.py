"""Agent and client reach the relay through an HTTP CONNECT proxy (HTTPS_PROXY)."""

import json
import os
import sys
import tempfile

from twisted.trial import unittest

from arc.testing.procs import Part, wait_for
from arc.tunnel.connectproxy import proxy_for
from tests.chain import Chain


def start_proxy(base, user=None):
    state = os.path.join(base, "proxy")
    argv = [sys.executable, "-m", "arc.testing.connectproxy", "--state-dir", state]
    if user:
        argv += ["--user", user]
    part = Part("proxy", argv, os.path.join(base, "proxy.log")).start()
    port_file = os.path.join(state, "port")
    wait_for(lambda: os.path.exists(port_file) and open(port_file).read().strip(), 20,
             "the CONNECT proxy to listen", alive=part)
    part.port = int(open(port_file).read())
    part.connects = os.path.join(state, "connects.jsonl")
    return part


def connects(proxy):
    if not os.path.exists(proxy.connects):
        return []
    with open(proxy.connects) as f:
        return [json.loads(line) for line in f]


class ProxyForTests(unittest.TestCase):
    def test_environment_rules(self):
        env = {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "internal.example,.corp"}
        self.assertEqual(proxy_for("relay.example.com", environ=env), "http://proxy:3128")
        self.assertIsNone(proxy_for("internal.example", environ=env))
        self.assertIsNone(proxy_for("relay.corp", environ=env))
        self.assertIsNone(proxy_for("relay.example.com", environ={}))
        self.assertEqual(proxy_for("x", environ={"https_proxy": "http://a:1",
                                                 "HTTPS_PROXY": "http://b:2"}), "http://a:1")
        self.assertIsNone(proxy_for("x", configured="none", environ=env))
        self.assertEqual(proxy_for("internal.example", configured="http://c:3", environ=env),
                         "http://c:3")


class EgressThroughProxyTests(unittest.TestCase):
    timeout = 180

    def test_agent_and_client_through_connect_proxy(self):
        base = tempfile.mkdtemp(prefix="arc-proxy-")
        chain = Chain(base, with_client=False)
        self.addCleanup(chain.stop)
        proxy = start_proxy(base, user="egress:s3cret")
        chain.parts["proxy"] = proxy
        chain.start()
        env = dict(os.environ, HTTPS_PROXY="http://egress:s3cret@127.0.0.1:%d" % proxy.port,
                   NO_PROXY="")
        chain.parts["agent"].stop()
        chain.start_agent(name="agent-proxied", env=env)
        chain.start_client(env=env)
        chain.wait_ready()
        self.assertIn("ticker", chain.kubectl("get", "pods").stdout)
        seen = connects(proxy)
        target = "localhost:%d" % chain.files.relay_port
        self.assertGreaterEqual(len([c for c in seen if c["target"] == target and c["auth"]]), 2,
                                "both agent and client went through the proxy: %r" % (seen,))

    def test_no_proxy_bypasses_and_bad_credentials_are_explained(self):
        base = tempfile.mkdtemp(prefix="arc-proxy-")
        chain = Chain(base, with_client=False)
        self.addCleanup(chain.stop)
        proxy = start_proxy(base, user="egress:s3cret")
        chain.parts["proxy"] = proxy
        chain.start()
        bypass = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:%d" % proxy.port,
                      NO_PROXY="localhost")
        chain.start_client(env=bypass)
        chain.wait_ready()
        self.assertEqual(connects(proxy), [])
        chain.parts["client"].stop()
        wrong = dict(os.environ, HTTPS_PROXY="http://egress:wrong@127.0.0.1:%d" % proxy.port,
                     NO_PROXY="")
        part = chain.start_client(name="client-wrong", env=wrong)
        wait_for(lambda: "proxy refused CONNECT" in part.output(), 20,
                 "the client to explain the proxy refusal")
        self.assertIn("407", part.output())
        self.assertNotIn("s3cret", part.output())
        self.assertNotIn("wrong", part.output().replace("client-wrong", ""))


class RelayTLSMismatchTests(unittest.TestCase):
    timeout = 120

    def test_wrong_server_name_is_explained(self):
        base = tempfile.mkdtemp(prefix="arc-tls-")
        chain = Chain(base, with_client=False)
        self.addCleanup(chain.stop)
        chain.start()
        config = chain.variant(chain.files.client_config, "client-wrong-name.yaml",
                               lambda c: c["relay"].update(server_name="relay.wrong.example"))
        part = chain.start_client(config, name="client-wrong-name")
        wait_for(lambda: "TLS handshake with the relay failed" in part.output(), 20,
                 "the client to explain the TLS failure")
        self.assertIn("relay.server_name", part.output())

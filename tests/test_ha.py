"""Relay replicas, with real processes on 127.0.0.1, 127.0.0.2 and 127.0.0.3.

Three relays share one configuration and one certificate (names localhost
and 127.0.0.1-3) and listen on the same port of three loopback addresses.
One agent keeps a tunnel to each (``relay.addresses``); three clients each
start at a different replica and fail over to the next.

- Every replica serves the cluster.
- SIGKILL of one replica while kubectl runs in a loop through the two
  others: none of those requests fails; the client that was on the killed
  replica reconnects to a survivor and works again; the agent keeps its
  tunnels to the survivors.
- The killed replica comes back: the agent's tunnel to it returns.
"""

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time

from twisted.trial import unittest

from arc import demo, pki
from arc.testing.procs import free_port, port_in_use, start_apiserver, twist, wait_for
from tests.chain import Chain
from tests.faults import kill_all

REPLICAS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
TUNNEL = {"ping_interval": 1, "dead_after": 3}
RECONNECT = {"reconnect_initial": 0.2, "reconnect_max": 1.0}


def port_free_on_all(hosts):
    """A TCP port free on every address of ``hosts``."""
    for _ in range(50):
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on %s" % (hosts,))


def replica_certificate(state_dir):
    """The relays' CA and certificate, valid for localhost and the three addresses."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    ca, ca_key = pki.new_ca("arc replicas test CA")
    cert, key = pki.issue(ca, ca_key, "relay", dns_names=["localhost"], ips=REPLICAS)
    pki.write_private(os.path.join(state_dir, "relay-ca.crt"), ca, 0o644)
    pki.write_private(os.path.join(state_dir, "relay.crt"), cert, 0o644)
    pki.write_private(os.path.join(state_dir, "relay.key"), key)


class ReplicaChain(Chain):
    """Three relays, one agent dialing all of them, one client per replica."""

    def start(self):
        self.api = start_apiserver(self.base, tokens=self.api_tokens)
        self.parts["api"] = self.api
        state = os.path.join(self.base, "arc")
        replica_certificate(state)     # demo.prepare keeps an existing relay.key
        self.port = port_free_on_all(REPLICAS)
        self.files = demo.prepare(
            state, relay_port=self.port, client_port=free_port(),
            upstream_kubeconfig=os.path.join(self.api_dir, "kubeconfig"),
            api_token_file=self.token_file, tunnel=TUNNEL)
        self.relay_configs = {}
        for address in REPLICAS:
            self.relay_configs[address] = self.variant(
                self.files.relay_config, "relay-%s.yaml" % address,
                lambda c, a=address: c.update(listen="tcp:%d:interface=%s" % (self.port, a)))
            self.start_replica(address)

        def agent(c):
            c["relay"].update(RECONNECT, addresses=list(REPLICAS))

        self.start_agent(self.variant(self.files.agent_config, "agent.yaml", agent))
        self.kubeconfigs = {}
        for i, address in enumerate(REPLICAS):
            order = REPLICAS[i:] + REPLICAS[:i]   # starts at its replica, then the next
            kubeconfig = os.path.join(self.base, "kubeconfig-%d" % (i + 1))

            def client(c, order=order, i=i, kubeconfig=kubeconfig):
                c["relay"].update(RECONNECT, addresses=order)
                c["listen"] = "tcp:%d:interface=127.0.0.1" % free_port()
                c["state_dir"] = os.path.join(self.base, "client-%d-state" % (i + 1))
                c["kubeconfig"] = kubeconfig

            config = self.variant(self.files.client_config, "client-%d.yaml" % (i + 1), client)
            self.start_client(config, name="client-" + address)
            self.kubeconfigs[address] = kubeconfig
        for address in REPLICAS:
            wait_for(lambda: self.health(address)["agent_tunnels"] == 1, 30,
                     "the agent's tunnel to %s" % address)
        return self

    def start_replica(self, address):
        name = "relay-" + address
        self.add(name, twist("arc-relay", self.relay_configs[address]))
        wait_for(lambda: port_in_use(self.port, address), 20, "relay %s to listen" % address,
                 alive=self.parts[name])

    def health(self, address):
        ctx = ssl.create_default_context(cafile=os.path.join(self.files.state_dir,
                                                             "relay-ca.crt"))
        sock = socket.create_connection((address, self.port), timeout=5)
        conn = http.client.HTTPSConnection("localhost", self.port, context=ctx, timeout=5)
        conn.sock = ctx.wrap_socket(sock, server_hostname="localhost")
        try:
            conn.request("GET", "/healthz")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def get(self, via, check=False, timeout=20):
        """``kubectl get pods`` through the client that starts at replica ``via``."""
        return self.kubectl("get", "pods", kubeconfig=self.kubeconfigs[via], check=check,
                            timeout=timeout)


class ReplicaTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="arc-ha-")
        self.chain = ReplicaChain(self.base, with_client=False)
        self.addCleanup(self.chain.stop)
        self.chain.start()

    def test_one_replica_killed_and_back(self):
        chain = self.chain
        started = time.monotonic()
        for address in REPLICAS:
            wait_for(lambda: chain.get(address).returncode == 0, 30,
                     "kubectl through replica %s" % address)
            health = chain.health(address)
            self.assertEqual((health["agent_tunnels"], health["client_tunnels"]), (1, 1),
                             "replica %s: %r" % (address, health))
        killed, survivors = REPLICAS[0], REPLICAS[1:]
        results = {address: [] for address in survivors}
        stop = threading.Event()

        def loop(address):
            while not stop.is_set():
                answer = chain.get(address)
                results[address].append((time.monotonic(), answer.returncode,
                                         answer.stderr.strip()))

        threads = [threading.Thread(target=loop, args=(a,), daemon=True) for a in survivors]
        for thread in threads:
            thread.start()
        wait_for(lambda: all(len(r) >= 3 for r in results.values()), 20,
                 "requests through the survivors")
        chain.parts["relay-" + killed].kill()
        kill_time = time.monotonic()
        # The client that was on the killed replica fails over to a survivor.
        wait_for(lambda: chain.get(killed, timeout=10).returncode == 0, 20,
                 "the client of the killed replica to work through a survivor")
        failover = time.monotonic() - kill_time
        wait_for(lambda: sum(chain.health(a)["client_tunnels"] for a in survivors) == 3, 10,
                 "the three clients' tunnels on the survivors")
        for address in survivors:
            self.assertEqual(chain.health(address)["agent_tunnels"], 1)
        # Keep the loop running a little longer past the kill.
        wait_for(lambda: all(sum(1 for t, _, _ in r if t > kill_time + 2) >= 3
                             for r in results.values()), 30, "requests after the kill")
        stop.set()
        for thread in threads:
            thread.join(30)
        failed = [(a, code, err) for a, r in results.items() for _, code, err in r if code]
        counts = {a: len(r) for a, r in results.items()}
        self.assertEqual(failed, [], "requests through the survivors failed")
        # The killed replica comes back: the agent's tunnel to it returns.
        chain.start_replica(killed)
        back = time.monotonic()
        wait_for(lambda: chain.health(killed)["agent_tunnels"] == 1, 15,
                 "the agent's tunnel to the restarted replica")
        returned = time.monotonic() - back
        agent_log = chain.parts["agent"].output()
        self.assertIn("(%s) up" % killed, agent_log)
        print("\nreplicas: %s requests through the survivors, none failed; client failover "
              "%.2f s; agent back on the restarted replica after %.2f s; test %.1f s"
              % (counts, failover, returned, time.monotonic() - started))


class ReplicaDrainTests(unittest.TestCase):
    """SIGTERM of a replica: its tunnels get GOAWAY and are replaced at once."""

    timeout = 90

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="arc-ha-")
        self.chain = ReplicaChain(self.base, with_client=False)
        self.addCleanup(self.chain.stop)
        self.chain.start()
        self.procs = []
        self.addCleanup(kill_all, self.procs)

    def test_draining_replica_is_replaced_while_it_drains(self):
        from tests.chain import read_until
        chain = self.chain
        draining = REPLICAS[2]
        wait_for(lambda: chain.get(draining).returncode == 0, 30, "kubectl through %s"
                 % draining)
        logs = subprocess.Popen(
            [chain.kubectl_bin, "--kubeconfig", chain.kubeconfigs[draining], "--cache-dir",
             chain.cache, "logs", "-f", "ticker"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.procs.append(logs)
        read_until(logs, lambda text: text.count("\n") >= 2, 30)
        relay = chain.parts["relay-" + draining]
        os.kill(relay.pid, signal.SIGTERM)
        stopped = time.monotonic()
        # The relay drains (the endless logs keep it up to its drain deadline);
        # meanwhile its client has a new tunnel to the next replica already.
        wait_for(lambda: chain.get(draining, timeout=10).returncode == 0, 10,
                 "a new request through the client of the draining replica")
        replaced = time.monotonic() - stopped
        self.assertTrue(relay.running(), "the relay exited before the test could see it drain")
        self.assertLess(replaced, 5)
        self.assertIsNone(logs.poll(), "kubectl logs -f was cut at the GOAWAY")
        self.assertIn("drains the tunnel (GOAWAY): dialing a replacement",
                      chain.parts["client-" + draining].output())
        self.assertIn("drains the tunnel (GOAWAY): dialing a replacement",
                      chain.parts["agent"].output())
        print("\nreplica SIGTERM: its client served a new request through another replica "
              "after %.2f s, while the old tunnel drained" % (replaced,))

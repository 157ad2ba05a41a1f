"""Who may connect, and who may reach which cluster.

The registry holds only SHA-256 digests of tokens (tokens are random and
long, so a plain digest is enough and lookups stay O(1)); comparisons are
constant-time.  Access bindings name users and groups per cluster and are
checked on every stream open.
"""

import hashlib
import hmac
import re
from dataclasses import dataclass, field

from arc.config import cluster_name

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def token_digest(token):
    """The registry form of a token: lower-case hex SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Identity:
    name: str
    groups: tuple = ()

    def describe(self):
        return "user %r" % (self.name,)


@dataclass(frozen=True)
class Binding:
    users: frozenset = frozenset()
    groups: frozenset = frozenset()


@dataclass(frozen=True)
class Registry:
    clusters: dict = field(default_factory=dict)   # name -> agent token digest
    users: dict = field(default_factory=dict)      # token digest -> Identity
    bindings: dict = field(default_factory=dict)   # cluster -> Binding

    def agent_ok(self, cluster, token):
        expected = self.clusters.get(cluster)
        if expected is None or token is None:
            return False
        return hmac.compare_digest(expected, token_digest(token))

    def user(self, token):
        if not token:
            return None
        return self.users.get(token_digest(token))

    def allowed(self, identity, cluster):
        binding = self.bindings.get(cluster)
        if binding is None:
            return False
        return identity.name in binding.users or not binding.groups.isdisjoint(identity.groups)


def _digest(node, key):
    value = node.get(key, str).lower()
    if not _HEX64.match(value):
        raise node.error(key, "must be the hex SHA-256 of the token (64 hex digits; "
                              "`arc hash-token` prints it)")
    return value


def parse_registry(node):
    """``clusters:``, ``users:`` and ``bindings:`` of the relay configuration."""
    clusters = {}
    for name, entry in node.items("clusters"):
        cluster_name(node, "clusters." + name, name)
        clusters[name] = _digest(entry, "agent_token_sha256")
        entry.finish()
    users = {}
    names = set()
    for name, entry in node.items("users"):
        digest = _digest(entry, "token_sha256")
        if digest in users:
            raise entry.error("token_sha256", "the same token is registered for %r and %r"
                              % (users[digest].name, name))
        if name.startswith("system:"):
            raise entry.error("name", "user names starting with 'system:' are reserved")
        groups = entry.strings("groups")
        users[digest] = Identity(name, groups)
        names.add(name)
        entry.finish()
    bindings = {}
    for entry in node.list_of_nodes("bindings"):
        cluster = entry.get("cluster", str)
        if cluster not in clusters:
            raise entry.error("cluster", "cluster %r is not listed under clusters:" % (cluster,))
        users_bound = frozenset(entry.strings("users"))
        groups_bound = frozenset(entry.strings("groups"))
        if not users_bound and not groups_bound:
            raise entry.error("users", "a binding must name at least one user or group")
        old = bindings.get(cluster, Binding())
        bindings[cluster] = Binding(old.users | users_bound, old.groups | groups_bound)
        entry.finish()
    return Registry(clusters, users, bindings)

"""Static bearer tokens (for CI and break-glass access), stored as digests only.

The configuration holds the lower-case hex SHA-256 of each token (the form
:func:`arc.relay.registry.token_digest` produces and ``arc hash-token``
prints).  Tokens are long and random, so a plain digest is enough and a
lookup by digest stays O(1); the hit is confirmed with a constant-time
comparison.
"""

import hmac
import re

from arc.identity.model import STATIC, Principal
from arc.relay.registry import token_digest

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StaticTokens:
    """Digest → :class:`Principal` table.

    :param users: mapping of user name to ``(digest, groups)``.
    """

    def __init__(self, users):
        self._by_digest = {}
        for name, (digest, groups) in users.items():
            digest = digest.lower()
            self._by_digest[digest] = (digest, Principal(
                username=name, groups=tuple(groups), extra={}, issuer="", subject=name,
                method=STATIC))

    def __len__(self):
        return len(self._by_digest)

    def authenticate(self, token):
        """The principal whose token this is, or None."""
        if not token:
            return None
        digest = token_digest(token)
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry[0], digest):
            return None
        return entry[1]


def parse_static(node, name="static"):
    """The ``name: {token_sha256: HEX, groups: [...]}`` entries under ``node[name]``.

    Returns a :class:`StaticTokens`; raises ConfigError for a bad digest, a
    token registered twice, or a reserved ``system:`` name or group.
    """
    users = {}
    owner = {}
    section = node.section(name)
    for user, entry in node.items(name):
        digest = entry.get("token_sha256", str).lower()
        if not _HEX64.match(digest):
            raise entry.error("token_sha256", "must be the hex SHA-256 of the token (64 hex "
                                              "digits; `arc hash-token` prints it)")
        if digest in owner:
            raise entry.error("token_sha256", "the same token is registered for %r and %r; "
                                              "give each user its own token"
                              % (owner[digest], user))
        if user.startswith("system:"):
            raise section.error(user, "user names starting with 'system:' are reserved for "
                                   "Kubernetes; choose another name")
        groups = entry.strings("groups")
        for i, group in enumerate(groups):
            if group.startswith("system:"):
                raise entry.error("groups[%d]" % (i,), "groups starting with 'system:' are "
                                  "reserved for Kubernetes and never granted through arc")
        entry.finish()
        owner[digest] = user
        users[user] = (digest, groups)
    return StaticTokens(users)

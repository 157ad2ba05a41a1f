"""A JSON Web Key Set, reduced to the keys that may verify ID tokens.

Only RSA (2048 bits or more) and EC (P-256, P-384, P-521) signing keys are
kept; symmetric (``oct``) keys, encryption keys and keys that do not parse
are dropped.  A key is used for an algorithm only when its type (and curve)
fits and, if the key names an ``alg``, that ``alg`` is the token's.
"""

from jwt import PyJWK
from jwt.exceptions import PyJWTError

_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
MIN_RSA_BITS = 2048


class KeySetError(ValueError):
    """The document is not a usable key set; the message says why."""


def _fits(jwk, alg):
    if jwk.get("alg") not in (None, alg):
        return False
    if jwk["kty"] == "RSA":
        return alg in _RSA_ALGS
    if jwk["kty"] == "EC":
        return _EC_CURVES.get(alg) == jwk.get("crv")
    return False


class KeySet:
    """Verification keys by ``kid``; build it with :meth:`parse`."""

    def __init__(self, jwks, dropped=0):
        self._jwks = list(jwks)
        self.dropped = dropped
        self._cache = {}

    @classmethod
    def parse(cls, document, allowed):
        """The usable keys of a JWKS ``document`` (a dict) for algorithms ``allowed``.

        Raises :class:`KeySetError` if the document has no ``keys`` list or no
        usable key at all.
        """
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise KeySetError("the document has no `keys` list")
        usable, dropped = [], 0
        for jwk in keys:
            if not cls._usable(jwk, allowed):
                dropped += 1
                continue
            usable.append(jwk)
        if not usable:
            raise KeySetError("the document holds no usable signing key (RSA of %d bits or more, "
                              "or EC, for %s)" % (MIN_RSA_BITS, ", ".join(allowed)))
        return cls(usable, dropped)

    @staticmethod
    def _usable(jwk, allowed):
        if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC"):
            return False
        if jwk.get("use") not in (None, "sig"):
            return False
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            return False
        if not isinstance(jwk.get("kid", ""), str):
            return False
        algs = [a for a in allowed if _fits(jwk, a)]
        if not algs:
            return False
        try:
            key = PyJWK(jwk, algorithm=algs[0])
        except (PyJWTError, ValueError, TypeError):
            return False
        if jwk["kty"] == "RSA" and key.key.key_size < MIN_RSA_BITS:
            return False
        return True

    def __len__(self):
        return len(self._jwks)

    def kids(self):
        return [jwk.get("kid") for jwk in self._jwks]

    def has(self, kid):
        """True if some key has ``kid`` (any key at all when ``kid`` is None)."""
        if kid is None:
            return bool(self._jwks)
        return any(jwk.get("kid") == kid for jwk in self._jwks)

    def candidates(self, kid, alg):
        """:class:`jwt.PyJWK` objects bound to ``alg`` that may have signed the token.

        With a ``kid``, only the keys with that id; without one, every key that
        fits ``alg`` (as Kubernetes does).
        """
        out = []
        for index, jwk in enumerate(self._jwks):
            if kid is not None and jwk.get("kid") != kid:
                continue
            if not _fits(jwk, alg):
                continue
            key = self._cache.get((index, alg))
            if key is None:
                key = self._cache[(index, alg)] = PyJWK(jwk, algorithm=alg)
            out.append(key)
        return out

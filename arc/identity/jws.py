"""Look inside a compact JWS without trusting it.

Everything here runs before any key is looked up: the shape check (three
base64url parts, JSON objects), the algorithm check (asymmetric and on the
allow-list; never ``none``, never HMAC) and the unverified ``iss`` used only
to route a token to the issuer that must verify it.
"""

import base64
import binascii
import json
import re
from dataclasses import dataclass

from arc.identity.model import AuthError, shorten

#: Signature algorithms arc accepts at most (the default allow-list).
ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")

#: Tokens longer than this are refused before decoding (Entra tokens with many
#: claims stay well under 16 KiB).
MAX_TOKEN_LENGTH = 64 * 1024

_PART = re.compile(r"^[A-Za-z0-9_-]+$")
_SIGNATURE = re.compile(r"^[A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Unverified:
    """Header and claims of a token whose signature nobody has checked yet."""

    header: dict
    claims: dict


def _b64json(part):
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def parse_compact(token):
    """Split and decode ``token``; raises AuthError ``malformed``."""
    if not isinstance(token, str) or not token:
        raise AuthError("missing", "no token was sent; send `Authorization: Bearer <token>`")
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthError("malformed", "the token is longer than %d characters; this is not an "
                                     "ID token arc accepts" % (MAX_TOKEN_LENGTH,))
    parts = token.split(".")
    if len(parts) == 5:
        raise AuthError("malformed", "the token is an encrypted JWT (JWE); configure the "
                                     "identity provider to issue signed ID tokens")
    if (len(parts) != 3 or not _PART.match(parts[0]) or not _PART.match(parts[1])
            or not _SIGNATURE.match(parts[2])):
        raise AuthError("malformed", "the token is not a JWT (three base64url parts separated "
                                     "by dots); send the ID token issued by the identity "
                                     "provider")
    header = _b64json(parts[0])
    claims = _b64json(parts[1])
    if header is None or claims is None:
        raise AuthError("malformed", "the token's header or payload is not a base64url JSON "
                                     "object; send the ID token issued by the identity "
                                     "provider")
    return Unverified(header, claims)


def looks_like_jwt(token):
    """True if ``token`` has the shape of a signed JWT (nothing is verified)."""
    try:
        parse_compact(token)
    except AuthError:
        return False
    return True


def unverified_issuer(token):
    """The ``iss`` claim of ``token`` *without verifying anything*, or None.

    Use it only to choose which issuer verifies the token.
    """
    try:
        iss = parse_compact(token).claims.get("iss")
    except AuthError:
        return None
    return iss if isinstance(iss, str) else None


def check_algorithm(header, allowed):
    """The header's ``alg`` if it is on ``allowed``; else AuthError ``bad_algorithm``."""
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise AuthError("bad_algorithm", "the token names no signature algorithm (alg); "
                                         "send a token signed by the identity provider")
    if alg.lower() == "none":
        raise AuthError("bad_algorithm", "the token is unsigned (alg none); unsigned tokens "
                                         "are never accepted")
    if alg.upper().startswith("HS"):
        raise AuthError("bad_algorithm", "the token is signed with a shared secret (%s); only "
                                         "the identity provider's asymmetric keys are accepted"
                        % (shorten(alg, 16),))
    if alg not in allowed:
        raise AuthError("bad_algorithm", "the token is signed with %s, which is not in this "
                                         "issuer's algorithms (%s); add it to `algorithms` if "
                                         "the identity provider really uses it"
                        % (shorten(alg, 16), ", ".join(allowed)))
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise AuthError("malformed", "the token's key id (kid) is not a string")
    return alg

"""NATS identities: NKeys and the JWTs that nats-server's auth callout exchanges.

The hub answers nats-server's authorization requests itself (auth callout), so that approving a
cluster needs no server reload. nats-server speaks NATS JWTs: a JSON header and claims, signed
with an Ed25519 NKey ("ed25519-nkey"), base64url without padding. There is no maintained Python
library for these claims, and the part the hub needs is small: read the server's request, prove
the connecting agent holds its key (a signature over the server's nonce), and sign a user
JWT with the agent's permissions inside an authorization response.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys
import orjson

_HEADER = base64.urlsafe_b64encode(orjson.dumps({"typ": "JWT", "alg": "ed25519-nkey"})).rstrip(b"=")


class InvalidToken(ValueError):
    """A JWT or signature that does not hold."""


@dataclass(frozen=True)
class Permissions:
    """What a NATS user may publish and subscribe to (subjects, with wildcards)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass(frozen=True)
class AuthRequest:
    """What nats-server asks about a connecting client (the fields the hub decides on)."""

    server_id: str
    # The key the server made for this connection: the answer must be issued to it.
    user_nkey: str
    client_id: int
    host: str
    name: str
    user: str
    password: str
    token: str
    nkey: str
    nonce: str
    signed_nonce: str
    claims: dict[str, Any] = field(repr=False, default_factory=dict)


def new_seed(prefix: int = nkeys.PREFIX_BYTE_USER) -> bytes:
    """A new NKey seed ("SU..." for a user, "SA..." for an account)."""
    return bytes(nkeys.encode_seed(os.urandom(32), prefix))


def public_key(seed: bytes) -> str:
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


def load_or_create_seed(path: Path, prefix: int = nkeys.PREFIX_BYTE_USER) -> bytes:
    """The seed kept in `path`, made (readable by its owner only) on first use: an agent's identity
    is born where it runs, and only its public key ever leaves the machine."""
    if path.exists():
        return path.read_bytes().strip()
    seed = new_seed(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(seed + b"\n")
    return seed


def _raw_public(key: str, prefix: int) -> bytes:
    try:
        raw = base64.b32decode(key + "=" * (-len(key) % 8))
    except (binascii.Error, ValueError) as exc:
        raise InvalidToken(f"not an NKey: {key[:60]!r}") from exc
    if len(raw) != 35 or raw[0] != prefix or bytes(nkeys.crc16_checksum(raw[:-2])) != raw[-2:]:
        raise InvalidToken(f"not an NKey of the expected kind: {key[:60]!r}")
    return raw[1:33]


def valid_user_key(key: str) -> bool:
    try:
        _raw_public(key, nkeys.PREFIX_BYTE_USER)
    except InvalidToken:
        return False
    return True


def verify_nonce(user_key: str, nonce: str, signed_nonce: str) -> None:
    """Raise unless `signed_nonce` is `user_key`'s signature of the server's `nonce`: the proof
    that the client holds the key's seed, which nats-server leaves to the callout to check."""
    raw = _raw_public(user_key, nkeys.PREFIX_BYTE_USER)
    try:
        padded = signed_nonce + "=" * (-len(signed_nonce) % 4)
        signature = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
        nacl.signing.VerifyKey(raw).verify(nonce.encode(), signature)
    except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError) as exc:
        raise InvalidToken("the nonce signature does not match the key") from exc


def decode_unverified(token: str) -> dict[str, Any]:
    """A JWT's claims, its signature unchecked: used for the server's requests, which arrive on a
    subject only the hub's own identity may read."""
    try:
        _header, payload, _signature = token.split(".")
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error, orjson.JSONDecodeError) as exc:
        raise InvalidToken("not a JWT") from exc
    if not isinstance(claims, dict):
        raise InvalidToken("JWT claims are not an object")
    return claims


def auth_request(token: bytes) -> AuthRequest:
    """Parse nats-server's authorization request (a JWT on $SYS.REQ.USER.AUTH)."""
    claims = decode_unverified(token.decode(errors="replace"))
    nats = claims.get("nats") or {}
    server = nats.get("server_id") or {}
    client = nats.get("client_info") or {}
    connect = nats.get("connect_opts") or {}
    return AuthRequest(
        server_id=str(server.get("id", "")),
        user_nkey=str(nats.get("user_nkey", "")),
        client_id=int(client.get("id", 0) or 0),
        host=str(client.get("host", "")),
        name=str(connect.get("name", "")),
        user=str(connect.get("user", "")),
        password=str(connect.get("pass", "")),
        token=str(connect.get("auth_token", "")),
        nkey=str(connect.get("nkey", "")),
        nonce=str(client.get("nonce", "")),
        signed_nonce=str(connect.get("sig", "")),
        claims=claims,
    )


def _encode(claims: dict[str, Any], issuer: nkeys.KeyPair) -> str:
    payload = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=")
    signing_input = _HEADER + b"." + payload
    signature = base64.urlsafe_b64encode(issuer.sign(signing_input)).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


def _claims(
    issuer: nkeys.KeyPair, subject: str, audience: str, now: float, body: dict[str, Any]
) -> dict[str, Any]:
    return {
        "jti": secrets.token_hex(16),
        "iat": int(now),
        "iss": issuer.public_key.decode(),
        "sub": subject,
        "aud": audience,
        "nats": body,
    }


def authorize(
    request: AuthRequest,
    issuer_seed: bytes,
    account: str,
    name: str,
    permissions: Permissions,
    ttl: float,
    now: float | None = None,
) -> bytes:
    """The signed answer admitting the client into `account` as `name` with `permissions`, for
    `ttl` seconds: nats-server disconnects it when its user JWT expires, and the reconnect
    asks the hub again, so a revoked identity is out within a TTL at most."""
    issuer = nkeys.from_seed(bytearray(issuer_seed))
    now = time.time() if now is None else now
    user = _claims(
        issuer,
        request.user_nkey,
        account,
        now,
        {
            "pub": {"allow": list(permissions.publish)},
            "sub": {"allow": list(permissions.subscribe)},
            "subs": -1,
            "data": -1,
            "payload": -1,
            "type": "user",
            "version": 2,
        },
    )
    user["name"] = name
    user["exp"] = int(now + ttl)
    response = _claims(
        issuer,
        request.user_nkey,
        request.server_id,
        now,
        {"jwt": _encode(user, issuer), "type": "authorization_response", "version": 2},
    )
    return _encode(response, issuer).encode()


def refuse(request: AuthRequest, issuer_seed: bytes, reason: str, now: float | None = None) -> bytes:
    """The signed answer refusing the client, with the reason nats-server logs."""
    issuer = nkeys.from_seed(bytearray(issuer_seed))
    now = time.time() if now is None else now
    response = _claims(
        issuer,
        request.user_nkey,
        request.server_id,
        now,
        {"error": reason, "type": "authorization_response", "version": 2},
    )
    return _encode(response, issuer).encode()

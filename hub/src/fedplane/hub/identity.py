"""Authentication: who is calling the hub's gRPC API, from the call's credentials.

Three sources, each turning a credential into a `Principal`:

- a bearer token (`authorization: Bearer <token>`) found in the static token file, which holds
  the SHA-256 of each token, never the token, with the grants that token carries;
- an OIDC JWT in the same header, verified against a configured issuer, audience and the
  issuer's keys from a JWKS file (no network fetch), with the user name and groups taken
  from configured claims;
- the client certificate under mutual TLS: its subject CN is the name.

A bearer token, when present, decides alone: a bad one is refused, never ignored in favour of
the certificate. The token file and the JWKS file are read again when they change, so tokens
and keys rotate and revoke without a restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import jwt
import yaml

from fedplane.hub import authz
from fedplane.runtime import logs
from fedplane.runtime.config import AuthConfig, GrantConfig, OidcConfig, auth_configured

log = logs.get("fedplane.hub")
T = TypeVar("T")

TOKEN_PREFIX = "fpt_"
# How often a changed token or JWKS file is noticed (one stat per this long, not per call).
RELOAD_CHECK_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name, its groups, how it proved them, and what it may do."""

    name: str
    # "token", "oidc", "certificate", or "anonymous" (no authentication configured).
    method: str
    groups: frozenset[str] = frozenset()
    access: authz.Access = authz.NOTHING

    @property
    def anonymous(self) -> bool:
        return self.method == "anonymous"


# The caller when no authentication is configured: today's behaviour, everything allowed. Its
# idempotency keys are stored unscoped, as before authentication existed.
ANONYMOUS = Principal("anonymous", "anonymous", frozenset(), authz.EVERYTHING)

_current: ContextVar[Principal] = ContextVar("fedplane_principal", default=ANONYMOUS)


def current() -> Principal:
    """The caller of the RPC being served (set by the server's interceptor)."""
    return _current.get()


def serving(principal: Principal) -> Any:
    """Make `principal` the current caller; returns the token that `done` takes back."""
    return _current.set(principal)


def done(token: Any) -> None:
    _current.reset(token)


class Unauthenticated(Exception):
    """The call's credentials prove nobody; the message says why, for the caller."""


class ConfigFileError(Exception):
    """A token or JWKS file that cannot be used: the hub refuses to start on it."""


# ------------------------------------------------------------------ grants from configuration


def grant_rules(grants: Sequence[GrantConfig]) -> list[authz.GrantRule]:
    return [
        authz.GrantRule(
            authz.Grant(authz.Role(g.role), frozenset(g.queues or [authz.ALL_QUEUES])),
            frozenset(g.users),
            frozenset(g.groups),
        )
        for g in grants
    ]


# ------------------------------------------------------------------ static tokens


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh bearer token (256 random bits), recognisable by its prefix in a leaked log."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclasses.dataclass(frozen=True)
class TokenEntry:
    name: str
    sha256: bytes
    groups: frozenset[str]
    grants: tuple[authz.Grant, ...]


def parse_token_file(text: str, where: str) -> list[TokenEntry]:
    """The entries of a token file; every problem named, with its entry's index."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{where}: invalid YAML: {exc}") from None
    data = data or {}
    if not isinstance(data, dict) or not isinstance(data.get("tokens", []), list):
        raise ConfigFileError(f"{where}: expected a mapping with a list under 'tokens'")
    extra = set(data) - {"tokens"}
    if extra:
        raise ConfigFileError(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))} (known: tokens)")
    entries: list[TokenEntry] = []
    problems: list[str] = []
    known = {"name", "sha256", "roles", "queues", "groups"}
    for i, item in enumerate(data.get("tokens") or []):
        here = f"{where}: tokens[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{here}: expected a mapping")
            continue
        unknown = set(item) - known
        if unknown:
            problems.append(f"{here}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        name, digest = item.get("name"), str(item.get("sha256", "")).lower()
        if not isinstance(name, str) or not name:
            problems.append(f"{here}.name: required")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            problems.append(f"{here}.sha256: the token's SHA-256 in hex (64 digits) is required")
        lists: dict[str, list[str]] = {}
        for key in ("roles", "queues", "groups"):
            value = item.get(key, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                problems.append(f"{here}.{key}: expected a list of names")
                value = []
            lists[key] = value
        bad_roles = [r for r in lists["roles"] if r not in {role.value for role in authz.Role}]
        if bad_roles:
            problems.append(f"{here}.roles: {bad_roles[0]!r} is not a role (admin, submitter, viewer)")
            continue
        if problems:
            continue
        queues = frozenset(lists["queues"] or [authz.ALL_QUEUES])
        grants = tuple(authz.Grant(authz.Role(role), queues) for role in lists["roles"])
        entries.append(TokenEntry(str(name), bytes.fromhex(digest), frozenset(lists["groups"]), grants))
    seen: set[bytes] = set()
    for entry in entries:
        if entry.sha256 in seen:
            problems.append(f"{where}: {entry.name}: the same token (sha256) appears twice")
        seen.add(entry.sha256)
    if problems:
        raise ConfigFileError("; ".join(problems))
    return entries


def issue_token(
    path: str | os.PathLike[str],
    name: str,
    roles: Iterable[str],
    queues: Iterable[str] = (authz.ALL_QUEUES,),
    groups: Iterable[str] = (),
) -> str:
    """Add a new token for `name` to the token file (created 0600) and return the token itself,
    which is stored nowhere: only its hash goes into the file."""
    file = Path(path)
    data: dict[str, Any] = {"tokens": []}
    if file.exists():
        data = yaml.safe_load(file.read_text()) or {"tokens": []}
    token = new_token()
    entry: dict[str, Any] = {"name": name, "sha256": hash_token(token), "roles": list(roles)}
    entry["queues"] = list(queues)
    if groups:
        entry["groups"] = list(groups)
    data.setdefault("tokens", []).append(entry)
    text = yaml.safe_dump(data, sort_keys=False)
    parse_token_file(text, str(file))  # never write a file the hub would refuse
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return token


class _WatchedFile:
    """A file parsed again when its size or modification time changes (checked once a second);
    a change that does not parse keeps what was loaded before, and says so in the log."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    def read(self) -> str:
        try:
            stat = os.stat(self.path)
            self._stamp = (stat.st_mtime_ns, stat.st_size)
            return Path(self.path).read_text()
        except OSError as exc:
            raise ConfigFileError(f"{self.what}: cannot read {self.path}: {exc.strerror}") from None

    def changed(self) -> bool:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return False
        self._checked = now
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        return (stat.st_mtime_ns, stat.st_size) != self._stamp

    def reload(self, parse: Callable[[str], T]) -> T | None:
        try:
            value = parse(self.read())
        except ConfigFileError as exc:
            log.error("auth file not reloaded; keeping the previous one", file=self.path, error=str(exc))
            return None
        log.info("auth file reloaded", file=self.path)
        return value


class TokenFile:
    def __init__(self, path: str) -> None:
        self._file = _WatchedFile(path, "auth.tokens_file")
        self._entries = parse_token_file(self._file.read(), path)

    def lookup(self, token: str) -> TokenEntry | None:
        if self._file.changed():
            entries = self._file.reload(lambda text: parse_token_file(text, self._file.path))
            if entries is not None:
                self._entries = entries
        digest = hashlib.sha256(token.encode()).digest()
        found: TokenEntry | None = None
        for entry in self._entries:  # every entry compared, in constant time each
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found


# ------------------------------------------------------------------ OIDC


def parse_jwks(text: str, where: str) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS document by key id ("" for a key without one)."""
    try:
        data = json.loads(text)
        keys = data["keys"] if isinstance(data, dict) else None
        if not isinstance(keys, list) or not keys:
            raise ConfigFileError(
                f"{where}: expected a JWKS document ({{'keys': [...]}}) with at least one key"
            )
        out: dict[str, jwt.PyJWK] = {}
        for i, key in enumerate(keys):
            if isinstance(key, dict) and key.get("use", "sig") != "sig":
                continue  # an encryption key signs nothing
            try:
                out[str(key.get("kid", ""))] = jwt.PyJWK.from_dict(key)
            except (jwt.PyJWKError, jwt.InvalidKeyError, AttributeError) as exc:
                raise ConfigFileError(f"{where}: keys[{i}]: {exc}") from None
    except (ValueError, KeyError) as exc:
        raise ConfigFileError(f"{where}: not a JWKS document: {exc}") from None
    if not out:
        raise ConfigFileError(f"{where}: no signing key")
    return out


class OidcVerifier:
    def __init__(self, config: OidcConfig) -> None:
        self.config = config
        self._file = _WatchedFile(config.jwks_file, "auth.oidc.jwks_file")
        self._keys = parse_jwks(self._file.read(), config.jwks_file)

    def _refresh(self) -> None:
        if self._file.changed():
            keys = self._file.reload(lambda text: parse_jwks(text, self.config.jwks_file))
            if keys is not None:
                self._keys = keys

    def _key(self, token: str) -> jwt.PyJWK:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("bad token: not a well-formed JWT") from None
        self._refresh()
        kid = str(header.get("kid", ""))
        key = self._keys.get(kid)
        if key is None and not kid and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        if key is None:
            raise Unauthenticated(
                f"bad token: signed with key {kid!r}, which is not among the issuer's keys (jwks_file)"
            )
        if header.get("alg") != key.algorithm_name:
            raise Unauthenticated(
                f"bad token: algorithm {header.get('alg')!r} does not match its key ({key.algorithm_name})"
            )
        return key

    def verify(self, token: str) -> Principal:
        config = self.config
        key = self._key(token)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                "expired token: its exp has passed; get a new one from the issuer"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"bad token: not issued by {config.issuer}") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"bad token: not meant for this hub (audience {config.audience!r})"
            ) from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("bad token: not valid yet (nbf or iat in the future)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"bad token: no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("bad token: its signature does not verify with the issuer's key") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"bad token: {exc}") from None
        name = claims.get(config.username_claim)
        if not isinstance(name, str) or not name:
            raise Unauthenticated(f"bad token: no user name in its {config.username_claim!r} claim")
        groups = claims.get(config.groups_claim, [])
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, list):
            raise Unauthenticated(f"bad token: its {config.groups_claim!r} claim is not a list of groups")
        return Principal(name, "oidc", frozenset(str(g) for g in groups))


# ------------------------------------------------------------------ the authenticator


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


class Authenticator:
    """Turns a call's metadata and TLS peer into a Principal, or refuses with a reason."""

    def __init__(self, config: AuthConfig, trust_client_certificates: bool) -> None:
        self.rules = grant_rules(config.grants)
        self.tokens = TokenFile(config.tokens_file) if config.tokens_file else None
        self.oidc = OidcVerifier(config.oidc) if config.oidc.issuer else None
        # Only a certificate that gRPC verified against the client CA names anyone: that is
        # when the hub requires client certificates (it does not even ask for them otherwise).
        self.certificates = trust_client_certificates

    @classmethod
    def of(cls, config: AuthConfig, trust_client_certificates: bool) -> Authenticator | None:
        """None when no authentication is configured (every caller is ANONYMOUS)."""
        if not auth_configured(config):
            return None
        return cls(config, trust_client_certificates)

    def _resolved(self, principal: Principal, own: Iterable[authz.Grant] = ()) -> Principal:
        access = authz.resolve(principal.name, principal.groups, own, self.rules)
        return dataclasses.replace(principal, access=access)

    def authenticate(
        self, metadata: Iterable[tuple[str, str | bytes]], auth_context: Mapping[str, Iterable[bytes]]
    ) -> Principal:
        bearer = None
        for key, value in metadata:
            if key == "authorization":
                if bearer is not None:
                    raise Unauthenticated("bad credentials: more than one authorization header")
                bearer = value.decode(errors="replace") if isinstance(value, bytes) else value
        if bearer is not None:
            scheme, _, token = bearer.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("bad credentials: the authorization header must be 'Bearer <token>'")
            return self._bearer(token)
        if self.certificates:
            names = list(auth_context.get("x509_common_name", ()))
            if names:
                name = names[0].decode(errors="replace")
                return self._resolved(Principal(name, "certificate"))
        accepted = []
        if self.tokens is not None or self.oidc is not None:
            accepted.append("a bearer token")
        if self.certificates:
            accepted.append("a client certificate")
        raise Unauthenticated(f"no credentials: this hub needs {' or '.join(accepted) or 'a bearer token'}")

    def _bearer(self, token: str) -> Principal:
        if self.oidc is not None and looks_like_jwt(token):
            return self._resolved(self.oidc.verify(token))
        if self.tokens is not None:
            entry = self.tokens.lookup(token)
            if entry is not None:
                return self._resolved(Principal(entry.name, "token", entry.groups), entry.grants)
        raise Unauthenticated("bad token: not a token this hub knows (revoked, mistyped or for another hub)")

"""NATS identities for a local federation: the hub's NKey, the auth callout's issuer, and a
bootstrap token for the agents, made once in a data directory and reused after.

nats-server runs with auth callout answered by the hub (hub/admission.py): the hub's own key
bypasses it, every other connection must be an agent whose key the hub admits. The same
files serve `fedplane up`, the benches and the tests, so that the local federation runs as
production does, authenticated, with nothing for its user to set up.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from fedplane.runtime import bus, natsjwt
from fedplane.runtime.config import AgentConfig, HubConfig, NatsAuthConfig, from_mapping

ACCOUNT = "FEDPLANE"
# The user an edge site's leaf node authenticates as.
LEAF_USER = "edge-site"


@dataclass(frozen=True)
class NatsIdentities:
    """Where the hub's seed, the issuer's seed and the bootstrap token were written."""

    hub_seed_file: Path
    issuer_seed_file: Path
    bootstrap_token_file: Path
    system_seed_file: Path
    leaf_password_file: Path
    # The bootstrap token admits the agents that present it at once (a local federation owns
    # every cluster it runs); production tokens default to waiting for approval.
    auto_approve: bool = True

    @classmethod
    def create(cls, directory: Path, auto_approve: bool = True) -> NatsIdentities:
        directory.mkdir(parents=True, exist_ok=True)
        identities = cls(
            directory / "hub.nk",
            directory / "issuer.nk",
            directory / "bootstrap.token",
            directory / "system.nk",
            directory / "leaf.password",
            auto_approve,
        )
        natsjwt.load_or_create_seed(identities.hub_seed_file)
        natsjwt.load_or_create_seed(identities.system_seed_file)
        natsjwt.load_or_create_seed(identities.issuer_seed_file, nkeys.PREFIX_BYTE_ACCOUNT)
        if not identities.leaf_password_file.exists():
            _write_secret(identities.leaf_password_file, secrets.token_urlsafe(24).encode())
        if not identities.bootstrap_token_file.exists():
            _write_secret(identities.bootstrap_token_file, secrets.token_urlsafe(32).encode())
        return identities

    @property
    def hub_public_key(self) -> str:
        return natsjwt.public_key(self.hub_seed_file.read_bytes().strip())

    @property
    def issuer_public_key(self) -> str:
        return natsjwt.public_key(self.issuer_seed_file.read_bytes().strip())

    @property
    def account(self) -> str:
        return ACCOUNT

    @property
    def leaf_password(self) -> str:
        """What an edge site's leaf node authenticates with (one site here: the local demo's)."""
        return self.leaf_password_file.read_text().strip()

    @property
    def bootstrap_token(self) -> str:
        return self.bootstrap_token_file.read_text().strip()

    def server_config(self, edge_clusters: Sequence[str] = (), js_domain: str = "") -> list[str]:
        """nats-server configuration lines: the hub's account with JetStream, the hub's key as
        its one static user, and auth callout for everyone else.

        With `edge_clusters`, also the edge site's user, which its leaf node links as: a static
        user of the hub's account (a leaf connection does not pass the callout), held to those
        clusters' subjects (`bus.site_permissions`; nats-server takes permissions on a leaf
        connection only from an account's user, not from `leafnodes { authorization }`).
        """
        hub = self.hub_public_key
        system = natsjwt.public_key(self.system_seed_file.read_bytes().strip())
        users = [f"{{ nkey: {_q(hub)} }}"]
        bypass = [_q(hub), _q(system)]
        if edge_clusters:
            allowed = bus.site_permissions(edge_clusters, js_domain)
            users.append(
                f"{{ user: {_q(LEAF_USER)}, password: {_q(self.leaf_password)}, permissions: {{"
                f" publish: {json.dumps(list(allowed.publish))},"
                f" subscribe: {json.dumps(list(allowed.subscribe))} }} }}"
            )
            bypass.append(_q(LEAF_USER))
        return [
            f"accounts {{ {ACCOUNT}: {{ jetstream: enabled, users: [ {', '.join(users)} ] }},"
            f" SYS: {{ users: [ {{ nkey: {_q(system)} }} ] }} }}",
            "system_account: SYS",
            "authorization { auth_callout { "
            f"issuer: {_q(self.issuer_public_key)}, auth_users: [ {', '.join(bypass)} ],"
            f" account: {ACCOUNT} }} }}",
        ]

    def hub_settings(self) -> dict[str, Any]:
        """The hub configuration's `nats_auth` section (as in a YAML file)."""
        digest = hashlib.sha256(self.bootstrap_token.encode()).hexdigest()
        return {
            "seed_file": str(self.hub_seed_file),
            "issuer_seed_file": str(self.issuer_seed_file),
            "account": ACCOUNT,
            "system_seed_file": str(self.system_seed_file),
            "bootstrap_tokens": [{"name": "local", "sha256": digest, "auto_approve": self.auto_approve}],
        }

    def hub_config(self, config: HubConfig) -> HubConfig:
        """`config` with the hub's NATS identity and the callout it answers."""
        config.nats_auth = from_mapping(NatsAuthConfig, self.hub_settings(), "nats_auth")
        return config

    def agent_settings(self) -> dict[str, Any]:
        """The agent configuration's settings that present the bootstrap token (its key is made
        beside its state)."""
        return {"bootstrap_token_file": str(self.bootstrap_token_file)}

    def agent_config(self, config: AgentConfig) -> AgentConfig:
        config.bootstrap_token_file = str(self.bootstrap_token_file)
        return config


def _q(text: str) -> str:
    return json.dumps(text)


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data + b"\n")

"""Everything a local federation needs to run authenticated, made once in its data directory.

`fedplane up` is secure by default, as production must be: a throwaway CA issues the hub's
gRPC certificate and etcd's; etcd runs TLS with its own RBAC (the hub's user may touch its
prefix only); NATS admits agents by key through the hub's auth callout; and an administrator
token is written, with a context file the CLI reads, so that the demo still needs no flags.
Nothing here is fit for production use as it is (one CA for everything, a token on disk):
docs/security.md says how to bootstrap real credentials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedplane.client import context
from fedplane.client.sdk import Tls
from fedplane.hub.identity import issue_token
from fedplane.local import servers as embedded
from fedplane.local.etcdauth import SecuredEtcd, secure_etcd
from fedplane.local.natsauth import NatsIdentities
from fedplane.local.pki import CertificateAuthority, Issued
from fedplane.runtime.config import AgentConfig, EtcdTlsConfig, HubConfig, NatsTlsConfig, from_mapping

ADMIN = "admin"
# The first line of a context file `fedplane up` wrote: only such a file is ever replaced.
WRITTEN_BY_UP = "# written by fedplane up"


@dataclass(frozen=True)
class LocalSecurity:
    directory: Path
    ca: CertificateAuthority
    hub_cert: Issued
    tokens_file: Path
    admin_token: str
    nats: NatsIdentities

    @classmethod
    def create(cls, directory: Path, auto_approve: bool = True) -> LocalSecurity:
        ca = CertificateAuthority(directory / "pki")
        hub_cert = ca.issue("hub", server=True)
        tokens_file = directory / "tokens.yaml"
        token_file = directory / "admin.token"
        if token_file.exists() and tokens_file.exists():
            token = token_file.read_text().strip()
        else:
            tokens_file.unlink(missing_ok=True)
            token = issue_token(tokens_file, ADMIN, ["admin"])
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(token + "\n")
        nats = NatsIdentities.create(directory / "nats", auto_approve=auto_approve)
        return cls(directory, ca, hub_cert, tokens_file, token, nats)

    def start_etcd(
        self, data_dir: Path, extra_args: Sequence[str] = ()
    ) -> tuple[embedded.ServerProcess, SecuredEtcd]:
        """etcd serving TLS to clients with certificates from this CA, its auth enabled."""
        etcd = embedded.start_etcd(data_dir, tls=embedded.EtcdTls.issue(self.ca), extra_args=extra_args)
        try:
            return etcd, secure_etcd(etcd, self.ca)
        except Exception:
            etcd.stop()
            raise

    @property
    def nats_cert(self) -> Issued:
        """nats-server's certificate (made on first use)."""
        cert, key = self.ca.directory / "nats.pem", self.ca.directory / "nats.key"
        if cert.exists() and key.exists():
            return Issued(cert, key)
        return self.ca.issue("nats", server=True)

    def start_nats(self, data_dir: Path, **options: Any) -> embedded.ServerProcess:
        """nats-server speaking TLS only to its clients, with the hub's auth callout (and, given
        `leafnode_port`, edge sites' leaf nodes authenticating as the site)."""
        return embedded.start_nats(data_dir, auth=self.nats, tls=self.nats_cert, **options)

    def agent_config(self, config: AgentConfig) -> AgentConfig:
        """`config` trusting nats-server's certificate and presenting the bootstrap token."""
        config.nats_tls = NatsTlsConfig(ca_file=str(self.ca.cert_file))
        return self.nats.agent_config(config)

    def hub_settings(self, etcd: SecuredEtcd) -> dict[str, Any]:
        """The hub's settings for all of it (as in hub.yaml): TLS, token authentication, etcd's
        TLS and RBAC, NATS over TLS and the auth callout."""
        etcd_fields = {
            key: dataclasses.asdict(value) if isinstance(value, EtcdTlsConfig) else value
            for key, value in etcd.hub_fields().items()
        }
        return {
            **etcd_fields,
            "tls": {"cert_file": str(self.hub_cert.cert_file), "key_file": str(self.hub_cert.key_file)},
            "auth": {"tokens_file": str(self.tokens_file)},
            "nats_auth": self.nats.hub_settings(),
            "nats_tls": {"ca_file": str(self.ca.cert_file)},
        }

    def hub_config(self, config: HubConfig, etcd: SecuredEtcd) -> HubConfig:
        """`config` with `hub_settings` (each of their sections replaced whole)."""
        return from_mapping(HubConfig, {**dataclasses.asdict(config), **self.hub_settings(etcd)})

    @property
    def client_tls(self) -> Tls:
        return Tls(ca_file=str(self.ca.cert_file))

    def write_context(self, hub: str) -> list[Path]:
        """Write the administrator's context beside the credentials, and as the CLI's default
        unless the user has a context of their own there; the paths written."""
        written = [self._context(self.directory / "context.yaml", hub)]
        default = context.default_path()
        if not default.exists() or default.read_text().startswith(WRITTEN_BY_UP):
            written.append(self._context(default, hub))
        return written

    def remove_context(self) -> None:
        """Remove the CLI's default context if it is still the one written here (another `up`
        may have written its own since): once this federation stops, the CLI must not go on
        looking for its hub, with its CA and token, instead of the default one."""
        default = context.default_path()
        with contextlib.suppress(OSError):
            if default.read_text().startswith(self._mark):
                default.unlink()

    @property
    def _mark(self) -> str:
        """The first line of a context file written here."""
        return f"{WRITTEN_BY_UP} ({self.directory})\n"

    def _context(self, path: Path, hub: str) -> Path:
        context.write(path, hub, ca_file=str(self.ca.cert_file), token=self.admin_token)
        path.write_text(self._mark + path.read_text())
        return path

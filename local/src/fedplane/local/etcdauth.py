"""etcd's own RBAC for a local federation and for tests: the hub's user may touch its prefix only.

`secure_etcd` does what an operator does with etcdctl (docs/security.md, "etcd"), through
etcd's Auth API on a TLS channel: a `root` user (with etcd's root role, needed before auth can
be enabled), a `fedplane-hub` role with readwrite on `<prefix>/` and nothing else, the hub's
user with that role, then `auth enable`. With etcd's --client-cert-auth the user is named by
the common name of the client certificate issued here, so it needs no password; with
`password_file` it gets a password instead, for etcds that authenticate by password.

Calling it again on an etcd it has secured (a reused data directory) changes nothing and returns
the same settings: it acts as root by a root certificate from the same CA.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedplane.hub.etcd import prefix_end
from fedplane.hub.etcdpb import auth_pb2, rpc_pb2, rpc_pb2_grpc
from fedplane.local.pki import CertificateAuthority, Issued
from fedplane.local.servers import ServerProcess
from fedplane.runtime.config import EtcdTlsConfig

HUB_ROLE = "fedplane-hub"
HUB_USER = "fedplane-hub"
ROOT = "root"


@dataclass(frozen=True)
class SecuredEtcd:
    """How the hub reaches an etcd that `secure_etcd` set up, and the root identity kept for
    administration (tests, `etcdctl --cert ... --key ...`)."""

    endpoint: str
    tls: EtcdTlsConfig
    username: str = ""
    password_file: str = ""
    root: Issued | None = None

    def hub_fields(self) -> dict[str, Any]:
        """The HubConfig fields to set: `dataclasses.replace(config, **secured.hub_fields())`."""
        fields: dict[str, Any] = {"etcd_endpoint": self.endpoint, "etcd_tls": dataclasses.replace(self.tls)}
        if self.username:
            fields |= {"etcd_username": self.username, "etcd_password_file": self.password_file}
        return fields


def secure_etcd(
    etcd: ServerProcess,
    ca: CertificateAuthority,
    prefix: str = "/fedplane",
    user: str = HUB_USER,
    password_file: Path | None = None,
    timeout: float = 10,
) -> SecuredEtcd:
    """Enable etcd's auth with the hub's user limited to `prefix` (etcd must serve TLS with
    `ca`'s certificates: start_etcd(..., tls=EtcdTls.issue(ca))). The hub's client certificate
    is issued as `user`; with `password_file` the user also gets a random password, written
    there (0600), and the hub authenticates by it."""
    root = ca.issue(ROOT, client=True)
    hub = ca.issue(user, client=True)
    password = ""
    if password_file is not None:
        password = _read_or_make_password(password_file)
    credentials = grpc.ssl_channel_credentials(
        ca.cert_file.read_bytes(), root.key_file.read_bytes(), root.cert_file.read_bytes()
    )
    key = f"{prefix.rstrip('/')}/".encode()
    with grpc.secure_channel(etcd.address, credentials) as channel:
        auth = rpc_pb2_grpc.AuthStub(channel)
        no_password = auth_pb2.UserAddOptions(no_password=True)

        def once(call: Any, request: Any) -> None:
            """Make the change unless it is made already (a second run)."""
            try:
                call(request, timeout=timeout)
            except grpc.RpcError as exc:
                if "already exists" not in (exc.details() or "") and "already granted" not in (
                    exc.details() or ""
                ):
                    raise

        once(auth.UserAdd, rpc_pb2.AuthUserAddRequest(name=ROOT, options=no_password))
        once(auth.UserGrantRole, rpc_pb2.AuthUserGrantRoleRequest(user=ROOT, role=ROOT))
        once(auth.RoleAdd, rpc_pb2.AuthRoleAddRequest(name=HUB_ROLE))
        permission = auth_pb2.Permission(
            permType=auth_pb2.Permission.READWRITE, key=key, range_end=prefix_end(key)
        )
        once(auth.RoleGrantPermission, rpc_pb2.AuthRoleGrantPermissionRequest(name=HUB_ROLE, perm=permission))
        if password:
            once(auth.UserAdd, rpc_pb2.AuthUserAddRequest(name=user, password=password))
        else:
            once(auth.UserAdd, rpc_pb2.AuthUserAddRequest(name=user, options=no_password))
        once(auth.UserGrantRole, rpc_pb2.AuthUserGrantRoleRequest(user=user, role=HUB_ROLE))
        auth.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=timeout)
    return SecuredEtcd(
        endpoint=f"https://{etcd.address}",
        tls=EtcdTlsConfig(
            ca_file=str(ca.cert_file), cert_file=str(hub.cert_file), key_file=str(hub.key_file)
        ),
        username=user if password else "",
        password_file=str(password_file) if password else "",
        root=root,
    )


def _read_or_make_password(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(0o600)
    path.write_text(password + "\n")
    return password

"""The hub's connection to etcd: a gRPC channel of its own, and etcd's v3 API on it.

The hub speaks etcd's gRPC API itself, with stubs generated from etcd's own protos (vendored in
proto/fedplane/hub/etcdpb), rather than through a client library: aetcd 1.0, used before, opens
only plaintext channels, and the store already spoke raw etcd gRPC on its hot paths (batched
transactions, watches, lease keepalives) because a library's per-call objects cost too much.
Owning the channel makes TLS one argument (`grpc.ssl_channel_credentials`), and the hub then
authenticates the way etcd recommends: by a client certificate, whose common name etcd's
--client-cert-auth takes as the user name. A user name and password are the other way: etcd
trades them for a token sent with every call, renewed here when etcd forgets it (a restart) or
it expires. See docs/security.md, "etcd".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio as grpc_aio

from fedplane.hub.etcdpb import kv_pb2, rpc_pb2, rpc_pb2_grpc
from fedplane.runtime import logs
from fedplane.runtime.config import EtcdTlsConfig, StartupError

log = logs.get("fedplane.hub.etcd")


class EtcdError(Exception):
    """An etcd call failed; the message is etcd's (or gRPC's) reason."""


class EtcdUnavailable(EtcdError):
    """etcd did not answer (unreachable, too slow, or the hub's token was renewed meanwhile):
    nothing was decided, and the same call may succeed when retried."""


class EtcdRefused(EtcdError):
    """etcd refused the hub's identity, or its role's permissions do not cover the call."""


@dataclass(frozen=True, slots=True)
class EtcdCredentials:
    """What the hub presents to etcd, as read from the files its configuration names."""

    tls: bool = False
    # PEM: the CA that etcd's certificate must chain to (None: the system's roots), and the
    # hub's own certificate chain and key (None: no client certificate).
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    username: str = ""
    password: str = ""

    @classmethod
    def load(
        cls, endpoint: str, tls: EtcdTlsConfig, username: str = "", password_file: str = ""
    ) -> EtcdCredentials:
        """Read every file the settings name, before anything connects: an unreadable one is a
        one-line StartupError naming it."""

        def read(setting: str, path: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise StartupError(f"{setting}: cannot read {path}: {exc.strerror}") from exc

        password = read("etcd_password_file", password_file)
        return cls(
            tls=endpoint.startswith("https://") or bool(tls.ca_file or tls.cert_file),
            ca=read("etcd_tls.ca_file", tls.ca_file),
            cert=read("etcd_tls.cert_file", tls.cert_file),
            key=read("etcd_tls.key_file", tls.key_file),
            username=username,
            password=password.decode().strip() if password is not None else "",
        )


PLAINTEXT = EtcdCredentials()


def target(endpoint: str) -> str:
    """host:port of an etcd endpoint given with or without its scheme."""
    return endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")


class EtcdClient:
    """etcd's KV, Watch, Lease, Maintenance and Auth services on one channel.

    The store calls the stubs directly on its hot paths, passing `metadata` (the auth token,
    or None) with each call; the helpers below are for the rest (the leader key, the replicas'
    records, tests). Every failure is raised as an EtcdError (see `errors`).
    """

    def __init__(self, endpoint: str, credentials: EtcdCredentials = PLAINTEXT, timeout: float = 10) -> None:
        self.endpoint = endpoint
        self.credentials = credentials
        self.timeout = timeout
        if credentials.tls:
            channel_credentials = grpc.ssl_channel_credentials(
                credentials.ca, credentials.key, credentials.cert
            )
            self.channel: grpc_aio.Channel = grpc_aio.secure_channel(target(endpoint), channel_credentials)
        else:
            self.channel = grpc_aio.insecure_channel(target(endpoint))
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(self.channel)
        self.auth = rpc_pb2_grpc.AuthStub(self.channel)
        # The auth token with password authentication; None with a certificate or no auth.
        self.metadata: tuple[tuple[str, str], ...] | None = None
        self._renewing: asyncio.Task[None] | None = None

    async def authenticate(self) -> None:
        """Get a token for the configured user (nothing to do without one)."""
        if not self.credentials.username:
            return
        request = rpc_pb2.AuthenticateRequest(
            name=self.credentials.username, password=self.credentials.password
        )
        with self.errors():
            response = await self.auth.Authenticate(request, timeout=self.timeout)
        self.metadata = (("token", response.token),)

    def failure(self, exc: BaseException) -> BaseException:
        """`exc` as the EtcdError it means (other exceptions unchanged). An expired or forgotten
        token starts its renewal and is EtcdUnavailable: the caller's retry will carry the new one."""
        if not isinstance(exc, grpc_aio.AioRpcError):
            return exc
        code = exc.code()
        details = exc.details() or code.name
        if (
            code == grpc.StatusCode.UNAUTHENTICATED
            and "invalid auth token" in details
            and self.credentials.username
        ):
            self._renew_token()
            return EtcdUnavailable(f"{details} (renewing it)")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EtcdUnavailable(details)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or any(
            refusal in details for refusal in _REFUSALS
        ):
            return EtcdRefused(details)
        return EtcdError(details)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Raise gRPC failures of the calls inside as EtcdErrors."""
        try:
            yield
        except grpc_aio.AioRpcError as exc:
            raise self.failure(exc) from exc

    def _renew_token(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew(), name="etcd-token-renewal")

    async def _renew(self) -> None:
        try:
            await self.authenticate()
            log.info("etcd auth token renewed", user=self.credentials.username)
        except EtcdError as exc:
            log.warning("renewing the etcd auth token failed", user=self.credentials.username, error=str(exc))

    # Calls off the hot paths.
    async def get(self, key: bytes) -> kv_pb2.KeyValue | None:
        with self.errors():
            response = await self.kv.Range(
                rpc_pb2.RangeRequest(key=key), timeout=self.timeout, metadata=self.metadata
            )
        return response.kvs[0] if response.kvs else None

    async def get_prefix(self, prefix: bytes) -> list[kv_pb2.KeyValue]:
        """Every key under `prefix`, in one reply (for small sets: use the store's pages for jobs)."""
        request = rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        with self.errors():
            response = await self.kv.Range(request, timeout=self.timeout, metadata=self.metadata)
        return list(response.kvs)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write `key` (bound to `lease` unless 0); the revision of the write."""
        with self.errors():
            response = await self.kv.Put(
                rpc_pb2.PutRequest(key=key, value=value, lease=lease),
                timeout=self.timeout,
                metadata=self.metadata,
            )
        return int(response.header.revision)

    async def compact(self, revision: int) -> None:
        with self.errors():
            await self.kv.Compact(
                rpc_pb2.CompactionRequest(revision=revision, physical=True),
                timeout=self.timeout,
                metadata=self.metadata,
            )

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        with self.errors():
            response = await self.lease.LeaseGrant(
                rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=self.timeout, metadata=self.metadata
            )
        return int(response.ID)

    async def revoke_lease(self, lease: int) -> None:
        with self.errors():
            await self.lease.LeaseRevoke(
                rpc_pb2.LeaseRevokeRequest(ID=lease), timeout=self.timeout, metadata=self.metadata
            )

    async def keep_alive_once(self, lease: int) -> int:
        """Renew `lease` once, on a keepalive stream of its own; its TTL now (0: it is gone)."""

        async def request() -> AsyncIterator[rpc_pb2.LeaseKeepAliveRequest]:
            yield rpc_pb2.LeaseKeepAliveRequest(ID=lease)

        call = self.lease.LeaseKeepAlive(request(), timeout=self.timeout, metadata=self.metadata)
        try:
            with self.errors():
                async for response in call:
                    return int(response.TTL)
        finally:
            call.cancel()
        return 0

    async def lease_time_to_live(self, lease: int) -> rpc_pb2.LeaseTimeToLiveResponse:
        with self.errors():
            response: rpc_pb2.LeaseTimeToLiveResponse = await self.lease.LeaseTimeToLive(
                rpc_pb2.LeaseTimeToLiveRequest(ID=lease), timeout=self.timeout, metadata=self.metadata
            )
        return response

    async def leases(self) -> list[int]:
        """Every lease etcd holds (what `etcdctl lease list` shows)."""
        with self.errors():
            response = await self.lease.LeaseLeases(
                rpc_pb2.LeaseLeasesRequest(), timeout=self.timeout, metadata=self.metadata
            )
        return [int(lease.ID) for lease in response.leases]

    async def status(self) -> rpc_pb2.StatusResponse:
        """The answering member's status (its release, among others): any authenticated user may ask."""
        with self.errors():
            response: rpc_pb2.StatusResponse = await self.maintenance.Status(
                rpc_pb2.StatusRequest(), timeout=self.timeout, metadata=self.metadata
            )
        return response

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        await self.channel.close()


# What etcd answers, with INVALID_ARGUMENT, to a caller it does not know or let in.
_REFUSALS = ("user name is empty", "authentication failed", "user name not found", "permission denied")


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes a range or watch cover every key starting with `prefix`."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def describe(exc: Any) -> str:
    """An error's message on one line."""
    return " ".join(str(exc).split())


def startup_failure(endpoint: str, credentials: EtcdCredentials, prefix: str, exc: BaseException) -> str:
    """Why the hub could not start on etcd, in one line that says what to change.

    With TLS 1.3 etcd refuses a client certificate after the handshake, so gRPC reports only
    that the stream broke ("Unwrap failed"); etcd's reason goes to gRPC's own log.
    """
    reason = describe(exc)
    user = (
        f"user {credentials.username!r}"
        if credentials.username
        else "the user named by the client certificate's common name (etcd_tls.cert_file)"
        if credentials.cert
        else "the hub"
    )
    if isinstance(exc, EtcdRefused):
        if "user name is empty" in reason:
            return (
                f"etcd at {endpoint} requires authentication: give the hub a client certificate whose"
                " common name is its etcd user (etcd_tls.cert_file, key_file), or etcd_username and"
                " etcd_password_file"
            )
        if "authentication failed" in reason:
            return f"etcd at {endpoint} refused {user}: wrong user name or password ({reason})"
        return (
            f"etcd at {endpoint} denied {user} access to {prefix}/: its role needs readwrite on the"
            f" prefix {prefix}/ (docs/security.md, etcd) ({reason})"
        )
    if "handshake" in reason.lower():
        return (
            f"no TLS handshake with etcd at {endpoint}: it must serve TLS there, with a certificate"
            f" that etcd_tls.ca_file signed for this host name ({reason})"
        )
    if credentials.tls and ("Unwrap failed" in reason or "Socket closed" in reason):
        what = (
            "its client certificate (etcd_tls.cert_file) is not signed by a CA that etcd trusts"
            " (--trusted-ca-file)"
            if credentials.cert
            else "it gave no client certificate (etcd_tls.cert_file, key_file) and etcd requires one"
        )
        return f"etcd at {endpoint} refused the hub's TLS connection: {what} ({reason})"
    if not credentials.tls and "Socket closed" in reason:
        return (
            f"etcd at {endpoint} closed a plaintext connection: if it serves TLS, set etcd_tls"
            f" (ca_file, cert_file, key_file) ({reason})"
        )
    return f"cannot reach etcd at {endpoint}: {reason}"

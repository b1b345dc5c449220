"""Cluster admission: which agents take part, each proven by its own key.

An agent's identity is an NKey it makes where it runs; only the public key leaves. To join,
it connects to NATS with that key and a bootstrap token. nats-server asks the hub (auth
callout) about every such connection, and the hub answers from the cluster records in etcd:

- the key is the approved key of the cluster the connection names: admitted, with NATS
  permissions for that cluster's subjects alone (`bus.agent_permissions`);
- otherwise, with a valid bootstrap token for that name: the key is recorded as a request to
  join (`requested_key`) and refused until an administrator approves it
  (`fedplane clusters approve NAME`), or admitted at once when the token auto-approves;
- otherwise refused, and nothing is written: a stranger cannot even fill etcd with requests.

The signature over the server's nonce proves the client holds the key; nats-server leaves
that check to the callout. Approving, re-keying and removing are writes of the cluster's
record, which every replica watches; any replica answers the callout.

Removing a cluster marks its record REMOVED and cordoned, deletes its command consumer (no
command or manifest reaches it again) and its alive key (it is lost at once, and its jobs
follow their disconnect policy, as a lost cluster's do). Its agent cannot reconnect, and
whatever its live connection still sends is dropped, since the hub acts only on the
messages of admitted clusters (`admitted`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.errors import HubError
from fedplane.hub.store import NO_FENCE, Fence
from fedplane.hub.table import JobTable
from fedplane.runtime import bus, logs, natsjwt, timestamps
from fedplane.runtime.config import BootstrapToken, HubConfig
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
audit = logs.get("fedplane.audit")
CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
PENDING = pb.ADMISSION_PENDING
APPROVED = pb.ADMISSION_APPROVED
REMOVED = pb.ADMISSION_REMOVED


class ClusterRecords(Protocol):
    """What admission writes in etcd: cluster records, and a removed cluster's alive key."""

    async def update_cluster(
        self, name: str, change: Callable[[bytes | None], bytes], fence: Fence
    ) -> bytes: ...

    async def delete_alive(self, name: str) -> None: ...


@dataclass(frozen=True)
class Verdict:
    """The answer to one connection: admit it as `cluster`, or refuse it for `reason`; and the
    change to make to the cluster's record first (None: write nothing)."""

    cluster: str
    admit: bool
    reason: str
    change: Callable[[pb.Cluster], None] | None = None


def token_matching(tokens: list[BootstrapToken], presented: str, cluster: str) -> BootstrapToken | None:
    """The configured bootstrap token `presented` is, if it may be used for `cluster`."""
    if not presented:
        return None
    digest = hashlib.sha256(presented.encode()).hexdigest()
    for token in tokens:
        if hmac.compare_digest(digest, token.sha256.lower()) and any(
            fnmatch.fnmatchcase(cluster, pattern) for pattern in token.clusters
        ):
            return token
    return None


def decide(
    request: natsjwt.AuthRequest, record: pb.Cluster | None, tokens: list[BootstrapToken], now: float
) -> Verdict:
    """Admit, ask for approval, or refuse one agent connection (see the module docstring)."""
    name = request.name.removeprefix(bus.AGENT_NAME_PREFIX)
    if not request.name.startswith(bus.AGENT_NAME_PREFIX) or not bus.valid_cluster_name(name):
        return Verdict("", False, f"connection name {request.name[:80]!r} names no cluster")
    try:
        natsjwt.verify_nonce(request.nkey, request.nonce, request.signed_nonce)
    except natsjwt.InvalidToken as exc:
        return Verdict(name, False, f"no proof of an NKey: {exc}")
    key = request.nkey
    if record is not None and record.admission == APPROVED and hmac.compare_digest(record.public_key, key):
        return Verdict(name, True, "approved key")
    token = token_matching(tokens, request.token, name)
    if token is None:
        return Verdict(name, False, f"cluster {name}: unknown key and no valid bootstrap token")
    if token.auto_approve and (record is None or record.admission != APPROVED):

        def approve(cluster: pb.Cluster) -> None:
            _approve(cluster, key, f"token:{token.name}")

        return Verdict(name, True, f"auto-approved by bootstrap token {token.name}", approve)
    if record is not None and record.requested_key == key:
        return Verdict(name, False, f"cluster {name}: waiting for approval", None)

    def request_to_join(cluster: pb.Cluster) -> None:
        if cluster.admission != APPROVED and cluster.admission != REMOVED:
            cluster.admission = PENDING
        cluster.requested_key = key
        cluster.requested_time.CopyFrom(timestamps.at(now))

    why = "asks to change its key" if record is not None and record.admission == APPROVED else "asks to join"
    return Verdict(name, False, f"cluster {name} {why}: waiting for approval", request_to_join)


def _approve(cluster: pb.Cluster, key: str, by: str) -> None:
    cluster.admission = APPROVED
    cluster.public_key = key
    cluster.requested_key = ""
    cluster.ClearField("requested_time")
    cluster.approved_by = by
    if cluster.cordon_reason == REMOVED_REASON:
        cluster.cordoned = False
        cluster.cordon_reason = ""


REMOVED_REASON = "removed"


class ClusterAdmission:
    """The hub's side of admission: the callout it answers, and approve and remove."""

    def __init__(
        self,
        config: HubConfig,
        registry: ClusterRegistry,
        table: JobTable,
        store: ClusterRecords,
        clock: Clock,
    ) -> None:
        self.registry = registry
        self.table = table
        self.store = store
        self.clock = clock
        auth = config.nats_auth
        self.account = auth.account
        self.tokens = list(auth.bootstrap_tokens)
        self.issuer_seed = Path(auth.issuer_seed_file).read_bytes().strip() if auth.issuer_seed_file else b""
        self._js: bus.JetStream | None = None
        # A system-account connection (nats_auth.system_seed_file), to disconnect removed agents.
        self.system: bus.Connection | None = None

    @property
    def enabled(self) -> bool:
        """Whether the hub admits agents by key (with auth callout); off, any cluster that
        reports is taken in, as before admission existed (an insecure setup)."""
        return bool(self.issuer_seed)

    def admitted(self, name: str) -> bool:
        """Whether the hub acts on what `name` sends (reports, statuses, orphan queries)."""
        state = self.registry.clusters.get(name)
        admission = state.admin.admission if state is not None else pb.CLUSTER_ADMISSION_UNSPECIFIED
        if self.enabled:
            return admission == APPROVED
        return admission != REMOVED and admission != PENDING

    async def serve(self, nc: bus.Connection, js: bus.JetStream) -> list[bus.Subscription]:
        """Answer nats-server's authorization requests (one replica answers each)."""
        self._js = js
        if not self.enabled:
            return []
        for name, state in self.registry.clusters.items():
            if state.admin.admission == APPROVED:
                await bus.ensure_command_consumer(js, name)
        return [await nc.subscribe(CALLOUT_SUBJECT, queue=bus.HUB_QUEUE, cb=self._on_request)]

    async def _on_request(self, msg: bus.Message) -> None:
        try:
            request = natsjwt.auth_request(msg.data)
        except (natsjwt.InvalidToken, ValueError, TypeError):
            log.warning("authorization request dropped: it does not parse", bytes=len(msg.data))
            return
        try:
            await msg.respond(await self.answer(request))
        except Exception:
            log.exception("authorization request not answered", client=request.client_id)

    async def answer(self, request: natsjwt.AuthRequest) -> bytes:
        """The signed answer to one connection, after writing what the verdict changes."""
        name = request.name.removeprefix(bus.AGENT_NAME_PREFIX)
        state = self.registry.clusters.get(name) if bus.valid_cluster_name(name) else None
        verdict = decide(request, state.admin if state is not None else None, self.tokens, self.clock.time())
        if verdict.change is not None:
            change = verdict.change
            admin = await self._update(verdict.cluster, change)
            if verdict.admit and self._js is not None:
                await bus.ensure_command_consumer(self._js, verdict.cluster)
            if admin.requested_key:
                log.warning(
                    "cluster asks to join",
                    cluster=verdict.cluster,
                    key=admin.requested_key,
                    host=request.host,
                    reason=verdict.reason,
                )
        fields = {"cluster": verdict.cluster, "host": request.host, "key": request.nkey[:60]}
        if not verdict.admit:
            audit.warning("agent refused", reason=verdict.reason, **fields)
            return natsjwt.refuse(request, self.issuer_seed, verdict.reason)
        log.info("agent admitted", reason=verdict.reason, **fields)
        permissions = bus.agent_permissions(verdict.cluster)
        return natsjwt.authorize(
            request,
            self.issuer_seed,
            self.account,
            f"cluster:{verdict.cluster}",
            permissions,
            ttl=10 * 365 * 86400,
        )

    async def _update(self, name: str, change: Callable[[pb.Cluster], None]) -> pb.Cluster:
        """Change `name`'s record by compare-and-swap from any replica, and take it in at once
        (the watch brings the same record to every replica)."""

        def apply(blob: bytes | None) -> bytes:
            record = pb.Cluster.FromString(blob) if blob else pb.Cluster(name=name)
            change(record)
            return record.SerializeToString()

        blob = await self.store.update_cluster(name, apply, NO_FENCE)
        admin = pb.Cluster.FromString(blob)
        state, _ = self.registry.get_or_add(name)
        state.admin = admin
        self.table.capacity_changed()
        return admin

    # ------------------------------------------------------------------ administration
    async def approve(self, name: str, public_key: str, by: str = "an administrator") -> pb.Cluster:
        """Make the key `name` asked to join with its credential (or, given `public_key` for a
        cluster that asked nothing yet, pre-approve that key)."""
        if public_key and not natsjwt.valid_user_key(public_key):
            raise HubError("INVALID_ARGUMENT", "public_key: not an NKey user public key (U...)")
        state = self.registry.clusters.get(name)
        record = state.admin if state is not None else None
        requested = record.requested_key if record is not None else ""
        if not requested and not public_key:
            if record is not None and record.admission == APPROVED:
                return record
            raise HubError(
                "FAILED_PRECONDITION", f"cluster {name} has not asked to join; give its public key"
            )
        if public_key and requested and public_key != requested:
            raise HubError(
                "FAILED_PRECONDITION",
                f"cluster {name} asked to join with key {requested}, not {public_key}: nothing approved",
            )
        key = public_key or requested

        def approve(cluster: pb.Cluster) -> None:
            _approve(cluster, key, by)

        admin = await self._update(name, approve)
        if self._js is not None and self.enabled:
            await bus.ensure_command_consumer(self._js, name)
        audit.info("cluster approved", cluster=name, key=key, by=by)
        return admin

    async def remove(self, name: str, reason: str, by: str = "an administrator") -> tuple[pb.Cluster, int]:
        """Revoke `name`'s credential and treat its jobs as a lost cluster's."""
        state = self.registry.clusters.get(name)
        if state is None:
            raise HubError("NOT_FOUND", f"cluster {name} not found")
        before = pb.Cluster()
        before.CopyFrom(state.admin)
        now = self.clock.time()
        # Counted first: once it is lost, its jobs start to move.
        affected = self.table.active[name]

        def remove(cluster: pb.Cluster) -> None:
            cluster.admission = REMOVED
            cluster.public_key = ""
            cluster.requested_key = ""
            cluster.ClearField("requested_time")
            cluster.cordoned = True
            cluster.cordon_reason = REMOVED_REASON
            if not cluster.HasField("lost_time"):
                cluster.lost_time.CopyFrom(timestamps.at(now))

        await self._update(name, remove)
        if self._js is not None:
            await bus.delete_command_consumer(self._js, name)
        await self.store.delete_alive(name)
        if self.system is not None:
            closed = await bus.disconnect_clients(self.system, self.account, bus.agent_connection_name(name))
            log.info("removed cluster's connections closed", cluster=name, connections=closed)
        audit.warning("cluster removed", cluster=name, reason=reason, by=by, jobs_affected=affected)
        return before, affected

"""Hub and agent configuration, from YAML files with environment overrides.

Unknown keys are errors: a misspelt setting silently ignored is worse than a refusal to start.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


class StartupError(RuntimeError):
    """A daemon cannot start (a dependency unreachable, a port taken): reported in one line."""


@dataclasses.dataclass
class TelemetryConfig:
    # otlp | console | none
    exporter: str = "none"
    endpoint: str = ""
    log_format: str = "json"
    log_level: str = "info"


@dataclasses.dataclass
class MetricsConfig:
    """Prometheus metrics over HTTP (docs/operations.md, Metrics)."""

    # host:port of the metrics endpoint (port 0 picks one); empty: no metrics server.
    listen: str = ""


@dataclasses.dataclass
class WeightsConfig:
    data_locality: float = 3.0
    headroom: float = 1.0
    cost: float = 1.0
    preference: float = 2.0


@dataclasses.dataclass
class TlsConfig:
    """TLS on the hub's gRPC port: off while `cert_file` is empty."""

    # PEM certificate chain and private key the hub presents.
    cert_file: str = ""
    key_file: str = ""
    # PEM CA bundle that client certificates are checked against (mutual TLS).
    client_ca_file: str = ""
    # Refuse clients without a certificate signed by client_ca_file.
    require_client_cert: bool = False


@dataclasses.dataclass
class OidcConfig:
    """OIDC JWTs as bearer tokens: off while `issuer` is empty. Keys come from a file, never
    fetched: refresh it from the issuer's jwks_uri (the hub reads it again when it changes)."""

    issuer: str = ""
    audience: str = ""
    jwks_file: str = ""
    # The claim holding the user's name, and the one holding the list of groups.
    username_claim: str = "sub"
    groups_claim: str = "groups"
    # Clock skew tolerated on exp, nbf and iat.
    leeway_seconds: float = 30.0


@dataclasses.dataclass
class GrantConfig:
    """A role (admin, submitter, viewer) for these principal names (token entries, OIDC user
    names, client certificate CNs) and groups (OIDC groups, token entries' groups), in these
    queues ("*" or none listed: every queue; an admin's grant always covers every queue)."""

    role: str = ""
    users: list[str] = dataclasses.field(default_factory=list)
    groups: list[str] = dataclasses.field(default_factory=list)
    queues: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class AuthConfig:
    """Who may call the hub's gRPC API, and what each caller may do (docs/security.md). With
    none of it set, every caller is an anonymous administrator (see auth_configured)."""

    # YAML file of static bearer tokens: their SHA-256, name, roles, queues and groups.
    tokens_file: str = ""
    oidc: OidcConfig = dataclasses.field(default_factory=OidcConfig)
    grants: list[GrantConfig] = dataclasses.field(default_factory=list)


def auth_configured(auth: AuthConfig) -> bool:
    """Whether the hub authenticates its gRPC callers; when not, any caller may do anything."""
    return bool(auth.tokens_file or auth.oidc.issuer or auth.grants)


@dataclasses.dataclass
class EtcdTlsConfig:
    """TLS to etcd: on when any file is set (or etcd_endpoint starts with https://)."""

    # PEM CA bundle that etcd's server certificate is checked against (empty: the system's roots).
    ca_file: str = ""
    # The hub's client certificate and key. With etcd's --client-cert-auth and auth enabled, the
    # certificate's common name is the etcd user the hub acts as (its role: docs/security.md).
    cert_file: str = ""
    key_file: str = ""


@dataclasses.dataclass
class NatsTlsConfig:
    """TLS to nats-server: off while `ca_file` is empty (the server's certificate is checked
    against it); a client certificate is presented when `cert_file` is set."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


@dataclasses.dataclass
class BootstrapToken:
    """A token an agent presents (with its own key) to ask to join as one of `clusters`."""

    # A name for logs and the approval record ("approved_by: token:<name>").
    name: str = ""
    # SHA-256 of the token, hex: the hub never holds the token itself.
    sha256: str = ""
    # Clusters named by one of these shell patterns may use it ("*": any).
    clusters: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    # Admit the cluster at once (no `fedplane clusters approve`): for fleets provisioned by
    # automation that already vouches for the site.
    auto_approve: bool = False


@dataclasses.dataclass
class NatsAuthConfig:
    """The hub's NATS identity and the auth callout it answers (docs/security.md)."""

    # The hub's NKey seed ("SU..."): its public key is listed in nats-server's auth_callout
    # auth_users, so the hub bypasses the callout and alone may publish commands.
    seed_file: str = ""
    # The callout issuer's account NKey seed ("SA..."): its public key is auth_callout.issuer.
    # Set: the hub answers nats-server's authorization requests and admits agents by key.
    issuer_seed_file: str = ""
    # The nats-server account agents are placed in (the hub's own account).
    account: str = "FEDPLANE"
    # A user of nats-server's system account (an NKey seed, also in auth_callout's auth_users):
    # with it, removing a cluster also disconnects the connection its agent still holds.
    system_seed_file: str = ""
    bootstrap_tokens: list[BootstrapToken] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DisconnectConfig:
    """What happens to a job whose cluster is lost (a job's own `disconnect` overrides it)."""

    # requeue | wait | fail
    action: str = "requeue"
    # How long after the cluster is declared lost the action is taken. Not 0: a hub-side outage
    # (NATS, the hub's network) longer than the lost threshold loses every cluster at once, and
    # agents stop (fence) their requeueable workloads at lost threshold + this delay.
    requeue_after_seconds: float = 120.0


@dataclasses.dataclass
class HubConfig:
    listen: str = "127.0.0.1:50051"
    etcd_endpoint: str = "127.0.0.1:2379"
    # Every etcd key of this federation lives under this prefix.
    etcd_prefix: str = "/fedplane"
    nats_url: str = "nats://127.0.0.1:4222"
    # Identity stamped on workloads in member clusters (fedplane.io/hub label).
    hub_id: str = "fedplane"
    # This replica's name among the hub replicas (empty: host name and listen port).
    replica_id: str = ""
    # The leader lease's time to live: a dead leader is replaced within about this long.
    leader_lease_seconds: float = 5.0
    # A cluster with no heartbeat for this long is UNKNOWN: no new jobs, nothing evicted.
    cluster_unknown_after_seconds: float = 15.0
    # ... and for this long LOST (its lease in etcd expires): its jobs follow their disconnect policy.
    cluster_lost_after_seconds: float = 60.0
    # The same thresholds for clusters labelled as edge (weak links: longer by default).
    edge_cluster_unknown_after_seconds: float = 60.0
    edge_cluster_lost_after_seconds: float = 900.0
    # A cluster whose inventory carries this label with the value "true" is an edge cluster.
    edge_label: str = "fedplane.io/edge"
    # The default disconnect policy, and per-queue defaults over it (queue name -> policy).
    disconnect: DisconnectConfig = dataclasses.field(default_factory=DisconnectConfig)
    # When at least this fraction of the clusters is lost at once, no job is evicted from them
    # (the fault is more likely on the hub's side); Kubernetes' unhealthy-zone threshold.
    lost_disruption_fraction: float = 0.55
    queue_disconnect: dict[str, DisconnectConfig] = dataclasses.field(default_factory=dict)
    # Take jobs that name a queue nobody created, as queues without quota (development and
    # tests); without it such a job is refused. Queues are created with `fedplane apply`.
    implicit_queues: bool = False
    # A waiting queue head may preempt at most once per this many seconds (preemptor.py).
    preemption_interval_seconds: float = 1.0
    # A job whose gang is not RUNNING this long after its dispatch is evicted and requeued with
    # backoff (Kueue's waitForPodsReady); 0 turns it off (hub/gangs.py).
    gang_timeout_seconds: float = 0.0
    # The requeued job waits backoff x 2^(attempts - 1), at most the max, before it is placed again.
    requeue_backoff_seconds: float = 60.0
    requeue_backoff_max_seconds: float = 3600.0
    # A gang that times out on its this-many-th dispatch FAILS (reason GangTimeout); 0: never.
    max_attempts: int = 0
    # Events arriving within this window are placed in one batch.
    batch_window_seconds: float = 0.0
    # At most this many jobs are dispatched per placement cycle (the next cycle follows at once),
    # so that one cycle's etcd transaction and command burst stay bounded.
    max_dispatch_per_cycle: int = 1000
    # The etcd server's --max-txn-ops (etcd's default is 128): writes are batched up to it.
    etcd_max_txn_ops: int = 128
    # Run on an etcd release with a known data-loss bug (3.5.0 to 3.5.2, etcd-io/etcd#13766),
    # which the hub otherwise refuses at start.
    etcd_allow_unsafe_version: bool = False
    # TLS to etcd, with the hub's client certificate (docs/security.md, "etcd").
    etcd_tls: EtcdTlsConfig = dataclasses.field(default_factory=EtcdTlsConfig)
    # etcd password authentication instead of the certificate's name: the user, and a file
    # holding its password (etcd trades them for a token that the hub renews when it expires).
    etcd_username: str = ""
    etcd_password_file: str = ""
    # How long the JetStream streams keep commands and status updates.
    stream_max_age_seconds: float = 7 * 24 * 3600
    # Finished jobs (and their idempotency keys) are deleted this long after finishing; 0 = never.
    finished_job_retention_seconds: float = 7 * 24 * 3600
    # The largest gRPC request the hub reads; a larger one is refused with RESOURCE_EXHAUSTED.
    max_request_bytes: int = 4 * 1024 * 1024
    weights: WeightsConfig = dataclasses.field(default_factory=WeightsConfig)
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)
    nats_auth: NatsAuthConfig = dataclasses.field(default_factory=NatsAuthConfig)
    nats_tls: NatsTlsConfig = dataclasses.field(default_factory=NatsTlsConfig)
    # Run without authentication or TLS where they are not configured (a development setup):
    # without it the hub refuses to start unauthenticated; with it, it says so loudly.
    insecure: bool = False
    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)


@dataclasses.dataclass
class NodeShape:
    """A group of identical simulated nodes."""

    name: str = "node"
    count: int = 1
    resources: dict[str, Any] = dataclasses.field(default_factory=dict)
    gpu_type: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    taints: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SimulatedBackendConfig:
    nodes: list[NodeShape] = dataclasses.field(default_factory=list)
    # dataset id -> size (quantity such as 150Gi, or bytes)
    datasets: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Run time of a workload without a fedplane.io/simulated-duration annotation.
    default_duration_seconds: float = 10.0
    # Probability that a workload fails instead of succeeding.
    failure_rate: float = 0.0
    # Delay between creation and admission / admission and running.
    start_delay_seconds: float = 0.2
    seed: int = 0
    # Append each workload's creation, start and end (with cluster, job, generation and time)
    # to this JSON-lines file: what really ran where, for capacity planning and chaos checks.
    ledger_path: str = ""


@dataclasses.dataclass
class AgentConfig:
    cluster: str = ""
    nats_url: str = "nats://127.0.0.1:4222"
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    # Cluster-wide taints, "key=value:Effect".
    taints: list[str] = dataclasses.field(default_factory=list)
    # Relative cost per unit of capacity (lower is cheaper); 0 = unknown.
    cost: float = 0.0
    heartbeat_interval_seconds: float = 5.0
    inventory_interval_seconds: float = 30.0
    # After a change, wait this long before reporting, so that a burst of changes is one report.
    inventory_coalesce_seconds: float = 0.2
    # Status updates not yet acknowledged by JetStream are kept here across restarts.
    state_dir: str = ""
    hub_id: str = "fedplane"
    # Delete workloads the hub no longer assigns here (orphans) every this many seconds; 0 = never.
    gc_interval_seconds: float = 60.0
    backend: dict[str, Any] = dataclasses.field(default_factory=lambda: {"type": "simulated"})
    # The agent's NATS identity, an NKey seed made on first start (default: <state_dir>/nats.nk);
    # only its public key leaves the machine, in its request to join.
    nats_seed_file: str = ""
    # A file holding the bootstrap token that asks the hub to admit this cluster's key.
    bootstrap_token_file: str = ""
    nats_tls: NatsTlsConfig = dataclasses.field(default_factory=NatsTlsConfig)
    # Connect to NATS without an identity (a development setup; the hub must be insecure too).
    insecure: bool = False
    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)

    def simulated(self) -> SimulatedBackendConfig:
        settings = {k: v for k, v in self.backend.items() if k != "type"}
        try:
            return from_mapping(SimulatedBackendConfig, settings, "backend")
        except ConfigError as exc:
            raise ConfigError(f"cluster {self.cluster}: {exc}") from None


# The range of each numeric setting: (lowest, whether the lowest itself is refused, highest).
# Checked by name, so a setting of that name means the same in every section.
_RANGES: dict[str, tuple[float, bool, float]] = {
    "leader_lease_seconds": (1, False, math.inf),
    "leeway_seconds": (0, False, 3600),
    "cluster_unknown_after_seconds": (0, True, math.inf),
    "cluster_lost_after_seconds": (0, True, math.inf),
    "edge_cluster_unknown_after_seconds": (0, True, math.inf),
    "edge_cluster_lost_after_seconds": (0, True, math.inf),
    "requeue_after_seconds": (0, False, math.inf),
    "lost_disruption_fraction": (0, True, 1),
    "batch_window_seconds": (0, False, math.inf),
    "gang_timeout_seconds": (0, False, math.inf),
    # A backoff's end is a timestamp in the job's status: a year at most.
    "requeue_backoff_seconds": (0, False, 365 * 24 * 3600),
    "requeue_backoff_max_seconds": (0, False, 365 * 24 * 3600),
    "max_attempts": (0, False, math.inf),
    "preemption_interval_seconds": (0, False, 3600),
    "max_dispatch_per_cycle": (1, False, math.inf),
    # A job's create is up to 3 operations (spec, status, idempotency key) in one transaction.
    "etcd_max_txn_ops": (3, False, math.inf),
    "stream_max_age_seconds": (0, True, math.inf),
    "finished_job_retention_seconds": (0, False, math.inf),
    # At least one largest spec (512 KiB) with room to spare; gRPC takes a 32-bit size.
    "max_request_bytes": (1024 * 1024, False, 2**31 - 1),
    "data_locality": (0, False, math.inf),
    "headroom": (0, False, math.inf),
    "cost": (0, False, math.inf),
    "preference": (0, False, math.inf),
    "heartbeat_interval_seconds": (0, True, math.inf),
    "inventory_interval_seconds": (0, True, math.inf),
    "inventory_coalesce_seconds": (0, False, math.inf),
    "gc_interval_seconds": (0, False, math.inf),
    "count": (0, False, math.inf),
    "default_duration_seconds": (0, False, math.inf),
    "failure_rate": (0, False, 1),
    "start_delay_seconds": (0, False, math.inf),
}


# The values a setting may take, checked by name as the ranges are: refused at load, not by a
# traceback when telemetry starts.
_CHOICES: dict[str, tuple[str, ...]] = {
    "exporter": ("otlp", "console", "none"),
    "log_format": ("json", "console"),
    "log_level": ("debug", "info", "warning", "warn", "error", "critical"),
}


def _not_a_choice(name: str, value: Any, where: str) -> str | None:
    allowed = _CHOICES.get(name)
    if allowed is None or not isinstance(value, str):
        return None
    if value in allowed or (name == "log_level" and value.lower() in allowed):  # logging's own case
        return None
    return f"{where}: {value!r} is not one of {', '.join(allowed)}"


def _out_of_range(name: str, value: Any, where: str) -> str | None:
    """Why `value` is no good for setting `name`, or None (a 0 batch size fails at the first write,
    long after start-up, so the loader refuses it)."""
    limits = _RANGES.get(name)
    if limits is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    low, exclusive, high = limits
    if value < low or (exclusive and value == low) or value > high or math.isnan(value):
        wanted = f"above {low:g}" if exclusive else f"at least {low:g}"
        if high != math.inf:
            wanted = f"from {low:g} to {high:g}"
        return f"{where}: {value!r} is out of range; it must be {wanted}"
    return None


def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, converting nested dataclasses and naming bad keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        here = f"{where}.{key}" if where else str(key)
        if name not in fields:
            raise ConfigError(f"{here}: unknown setting (known: {', '.join(sorted(fields))})")
        try:
            kwargs[name] = _convert(hints[name], value, here)
        except ConfigError as exc:  # a nested section's problems, all of them
            problems.append(str(exc))
            continue
        why = _out_of_range(name, kwargs[name], here) or _not_a_choice(name, kwargs[name], here)
        if why:
            problems.append(why)
    if problems:
        raise ConfigError("; ".join(problems))
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_mapping(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        _, item = typing.get_args(hint)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is Any or isinstance(hint, types.UnionType):
        return value
    return value


def load(cls: type[T], path: str | os.PathLike[str] | None, env_prefix: str) -> T:
    """Load a config file (or defaults) and apply FEDPLANE_<SECTION>_<KEY> string overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        data = loaded or {}
    try:
        config = from_mapping(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    assert dataclasses.is_dataclass(config)
    for f in dataclasses.fields(config):
        env = os.environ.get(f"{env_prefix}{f.name.upper()}")
        if env is not None and f.type in ("str", "float", "int", str, float, int):
            where = f"{env_prefix}{f.name.upper()}"
            value = _convert(typing.get_type_hints(cls)[f.name], _coerce(env), where)
            why = _out_of_range(f.name, value, where)
            if why:
                raise ConfigError(why)
            setattr(config, f.name, value)
    return config


def _coerce(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


DISCONNECT_ACTIONS = ("requeue", "wait", "fail")


def _etcd_problems(config: HubConfig) -> list[str]:
    problems = []
    etcd_tls = config.etcd_tls
    if bool(etcd_tls.cert_file) != bool(etcd_tls.key_file):
        problems.append("etcd_tls: cert_file and key_file go together")
    if config.etcd_endpoint.startswith("http://") and (etcd_tls.ca_file or etcd_tls.cert_file):
        problems.append(
            "etcd_endpoint: http:// is plaintext, but etcd_tls is set (use https:// or no scheme)"
        )
    if bool(config.etcd_username) != bool(config.etcd_password_file):
        problems.append("etcd_username and etcd_password_file go together")
    return problems


def unsecured(config: HubConfig) -> list[str]:
    """What of the hub's security is not configured: each an open door, which a production hub
    refuses to run with unless told `insecure: true` (docs/security.md)."""
    missing = []
    if not config.tls.cert_file:
        missing.append("TLS on the gRPC port (tls)")
    if not auth_configured(config.auth):
        missing.append("authentication of gRPC callers (auth)")
    if not config.nats_auth.issuer_seed_file:
        missing.append("agent admission by key on NATS (nats_auth)")
    if not (
        config.etcd_tls.ca_file or config.etcd_tls.cert_file or config.etcd_endpoint.startswith("https://")
    ):
        missing.append("TLS to etcd (etcd_tls)")
    return missing


def check_hub(config: HubConfig) -> HubConfig:
    """Refuse settings that are each in range but make no sense together."""
    problems = []
    for prefix in ("", "edge_"):
        unknown = getattr(config, f"{prefix}cluster_unknown_after_seconds")
        lost = getattr(config, f"{prefix}cluster_lost_after_seconds")
        if lost <= unknown:
            problems.append(
                f"{prefix}cluster_lost_after_seconds: {lost:g} must be longer than"
                f" {prefix}cluster_unknown_after_seconds ({unknown:g})"
            )
    policies = {"disconnect": config.disconnect} | {
        f"queue_disconnect.{queue}": policy for queue, policy in config.queue_disconnect.items()
    }
    for where, policy in policies.items():
        if policy.action not in DISCONNECT_ACTIONS:
            problems.append(
                f"{where}.action: {policy.action!r} is not one of {', '.join(DISCONNECT_ACTIONS)}"
            )
    if config.requeue_backoff_max_seconds < config.requeue_backoff_seconds:
        problems.append(
            f"requeue_backoff_max_seconds: {config.requeue_backoff_max_seconds:g} must be at least"
            f" requeue_backoff_seconds ({config.requeue_backoff_seconds:g})"
        )
    tls = config.tls
    if bool(tls.cert_file) != bool(tls.key_file):
        problems.append("tls: cert_file and key_file go together")
    if (tls.client_ca_file or tls.require_client_cert) and not tls.cert_file:
        problems.append("tls: client certificates need TLS itself (cert_file and key_file)")
    if tls.require_client_cert and not tls.client_ca_file:
        problems.append("tls.require_client_cert: needs client_ca_file to check them against")
    problems += _etcd_problems(config)
    problems += _auth_problems(config.auth)
    if problems:
        raise ConfigError("; ".join(problems))
    return config


ROLES = ("admin", "submitter", "viewer")


def _auth_problems(auth: AuthConfig) -> list[str]:
    problems = []
    oidc = auth.oidc
    if oidc.issuer and not (oidc.audience and oidc.jwks_file):
        problems.append("auth.oidc: issuer needs audience and jwks_file (the issuer's keys)")
    if not oidc.issuer and (oidc.audience or oidc.jwks_file):
        problems.append("auth.oidc: audience and jwks_file need issuer")
    if not oidc.username_claim:
        problems.append("auth.oidc.username_claim: must name a claim")
    for i, grant in enumerate(auth.grants):
        where = f"auth.grants[{i}]"
        if grant.role not in ROLES:
            problems.append(f"{where}.role: {grant.role!r} is not one of {', '.join(ROLES)}")
        if not grant.users and not grant.groups:
            problems.append(f"{where}: names no users and no groups")
        if grant.role == "admin" and set(grant.queues) - {"*"}:
            problems.append(f"{where}.queues: an admin grant covers every queue; leave queues out")
        if any(not name for name in [*grant.users, *grant.groups, *grant.queues]):
            problems.append(f"{where}: empty name")
    return problems


def load_hub(path: str | os.PathLike[str] | None) -> HubConfig:
    try:
        return check_hub(load(HubConfig, path, "FEDPLANE_HUB_"))
    except ConfigError as exc:
        if path and not str(exc).startswith(str(path)):
            raise ConfigError(f"{path}: {exc}") from None
        raise


def load_agent(path: str | os.PathLike[str]) -> AgentConfig:
    config = load(AgentConfig, path, "FEDPLANE_AGENT_")
    if not config.cluster:
        raise ConfigError(f"{path}: cluster: the cluster name is required")
    return config

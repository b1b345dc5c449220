"""Faults, the named chaos scenarios, and running one: start the harness, submit a steady
stream of jobs, inject the scenario's faults, let the federation settle, then read back what
happened and check the invariants.

Each fault heals itself before it returns (a killed process is started again, a cut link
restored), so that whatever runs next, or the settling, starts from a whole federation.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedplane.chaos import history, invariants
from fedplane.chaos.invariants import TERMINAL, Change, Result, Run
from fedplane.chaos.load import LoadGenerator, LoadParams
from fedplane.chaos.processes import Event, Harness, HarnessError, Settings
from fedplane.local.servers import EmbeddedError

Observations = dict[str, Any]
Act = Callable[[Harness, Observations], Awaitable[None]]


# -- faults ------------------------------------------------------------------------------------------


async def kill_leader(h: Harness, obs: Observations, restart_after: float) -> None:
    """kill -9 the leading hub; with replicas, time the takeover; start it again after `restart_after`."""
    leader = await h.leader()
    await h.kill_hub(leader)
    killed_at = time.monotonic()
    try:
        if h.ha and len(h.hubs) > 1:
            new, took = await h.wait_leader_other_than(leader, within=h.settings.timings.lease * 4 + 10)
            h.record("leads", new, f"took over {took:.2f}s after the kill")
            obs.setdefault("takeovers", []).append({"from": leader, "to": new, "seconds": round(took, 2)})
        await asyncio.sleep(max(0.0, restart_after - (time.monotonic() - killed_at)))
    finally:
        h.start_hub(leader)


async def kill_agent(h: Harness, obs: Observations, name: str, down_for: float) -> None:
    """kill -9 an agent and start it again after `down_for` (its simulated cluster runs on)."""
    runs = await asyncio.to_thread(history.read_runs, {name: h.ledgers[name]})
    running = len(invariants.open_workloads(runs))
    killed_at = time.time()
    await h.kill_agent(name, f"{running} workloads in its cluster")
    obs.setdefault("agent_kills", []).append({"agent": name, "workloads": running, "killed_at": killed_at})
    try:
        await asyncio.sleep(down_for)
    finally:
        h.start_agent(name)


async def restart_nats(h: Harness, obs: Observations, down_for: float) -> None:
    await h.restart_nats(down_for)


async def restart_etcd(h: Harness, obs: Observations, down_for: float) -> None:
    await h.restart_etcd(down_for)


async def restart_nats_then_etcd(h: Harness, obs: Observations, down_for: float) -> None:
    """Both stores of the federation, one after the other, under one stream of submissions."""
    await h.restart_nats(down_for)
    await asyncio.sleep(1.0)
    await h.restart_etcd(down_for)


async def pause_leader(h: Harness, obs: Observations, paused_for: float) -> None:
    """SIGSTOP the leading hub for `paused_for` (past its lease), then SIGCONT it, and read what
    it says and logs once it runs again."""
    leader = await h.leader()
    h.pause_hub(leader)
    paused_at = time.monotonic()
    took_over = ""
    try:
        if h.ha and len(h.hubs) > 1:
            took_over, took = await h.wait_leader_other_than(leader, within=paused_for + 10)
            h.record("leads", took_over, f"took over {took:.2f}s after the pause")
        await asyncio.sleep(max(0.0, paused_for - (time.monotonic() - paused_at)))
    finally:
        resumed_at_line = len(h.hubs[leader].log_lines())
        h.resume_hub(leader)
    pause: dict[str, Any] = {"replica": leader, "paused_seconds": paused_for, "taken_over_by": took_over}
    obs.setdefault("pauses", []).append(pause)
    if not took_over:
        return
    deadline = time.monotonic() + 10
    fencing = 0
    while time.monotonic() < deadline:
        status = await h.hub_status(leader)
        if status is not None and status.leader != leader:
            pause["leader_after_resume"] = status.leader
            fencing = status.fencing_revision
            break
        await asyncio.sleep(0.1)
    logged = h.hubs[leader].log_lines()[resumed_at_line:]
    # Until it leads again (if it ever does), it must not write. The hub logs a dispatch once
    # its write is in etcd, with the write's revision: a line logged after the resume for a
    # write made before the takeover (its reply read only once the process ran again) is below
    # the new leader's fencing revision, and is no write of a deposed leader.
    deposed = list(itertools.takewhile(lambda line: '"event":"leading"' not in line, logged))
    pause["logged_stopped_leading"] = any('"stopped leading"' in line for line in deposed)
    pause["dispatched_while_deposed"] = sum(
        1 for line in deposed if '"job dispatched"' in line and _revision_of(line) >= fencing
    )


def _revision_of(line: str) -> int:
    """The etcd revision a hub log line names (none named: counted as a write after any takeover)."""
    try:
        found = json.loads(line).get("revision")
    except (ValueError, AttributeError):
        return 1 << 62
    return int(found) if isinstance(found, int) else 1 << 62


async def cut_edge(h: Harness, obs: Observations, name: str, cut_for: float) -> None:
    """Cut an edge site's link to the hub's NATS for `cut_for`, then restore it."""
    await h.cut(name)
    cut_at = time.time()
    try:
        await asyncio.sleep(cut_for)
        # Nothing the site did while cut off can be in etcd below this revision.
        before_restore = await history.revision(h.etcd_endpoint)
    finally:
        restored_at = time.time()
        await h.restore(name)
    obs.setdefault("cuts", []).append(
        {
            "agent": name,
            "seconds": cut_for,
            "cut_at": cut_at,
            "restored_at": restored_at,
            "revision_before_restore": before_restore,
        }
    )


# -- scenarios ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    settings: Settings
    load: LoadParams
    act: Act
    # Seconds of load before the faults, and after them.
    warmup: float = 2.0
    cooldown: float = 2.0
    needs_ha: bool = False


def _scenarios() -> dict[str, Scenario]:
    single = Settings(hubs=1, agents=3)
    pair = Settings(hubs=2, agents=3)
    edge = Settings(hubs=1, agents=2, edge_agents=1)
    t = single.timings
    steady = LoadParams(rate=8.0, durations=(0.3, 1.5))
    out = [
        Scenario(
            "kill-leader",
            "kill -9 the leading hub during a stream of submissions while a second replica runs",
            pair,
            steady,
            lambda h, obs: kill_leader(h, obs, restart_after=t.lease * 2 + 2),
            needs_ha=True,
        ),
        Scenario(
            "kill-hub",
            "kill -9 the only hub during a stream of submissions and start it again",
            single,
            steady,
            lambda h, obs: kill_leader(h, obs, restart_after=1.0),
        ),
        Scenario(
            "kill-agent",
            "kill -9 an agent mid-run and start it again before its cluster is unknown",
            single,
            replace(steady, durations=(1.0, 3.0)),
            lambda h, obs: kill_agent(h, obs, "c0", down_for=1.0),
            warmup=3.0,
        ),
        Scenario(
            "edge-short-cut",
            "cut an edge agent off for longer than its heartbeat, shorter than its lost timeout",
            edge,
            LoadParams(rate=8.0, durations=(0.5, 2.5), edge_share=0.6),
            lambda h, obs: cut_edge(h, obs, "edge0", cut_for=t.unknown_after + 1.0),
            warmup=3.0,
        ),
        Scenario(
            "edge-long-cut",
            "cut an edge agent off for longer than its lost timeout: its jobs run elsewhere once",
            edge,
            # Longer than the site takes to fence them (about its lost timeout and requeue delay
            # after the cut), so that the old copies are deleted rather than completed.
            LoadParams(rate=4.0, durations=(10.0, 13.0), edge_share=0.6),
            lambda h, obs: cut_edge(h, obs, "edge0", cut_for=t.lost_after + t.requeue_after + 4.0),
            warmup=3.0,
            cooldown=3.0,
        ),
        Scenario(
            "restart-nats",
            "kill -9 nats-server and start it again on the same data",
            single,
            steady,
            lambda h, obs: restart_nats(h, obs, down_for=1.5),
            cooldown=3.0,
        ),
        Scenario(
            "restart-etcd",
            "kill -9 etcd and start it again on the same data dir",
            single,
            steady,
            lambda h, obs: restart_etcd(h, obs, down_for=1.5),
            cooldown=3.0,
        ),
        Scenario(
            "restart-nats-then-etcd",
            "kill -9 nats-server and start it again, then the same for etcd, under one load",
            single,
            steady,
            lambda h, obs: restart_nats_then_etcd(h, obs, down_for=1.5),
            cooldown=3.0,
        ),
        Scenario(
            "pause-leader",
            "SIGSTOP the leading hub past its lease while a second replica runs, then SIGCONT it",
            pair,
            steady,
            lambda h, obs: pause_leader(h, obs, paused_for=t.lease * 2 + 1),
            cooldown=3.0,
            needs_ha=True,
        ),
    ]
    return {s.name: s for s in out}


SCENARIOS = _scenarios()


# -- running one --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    results: list[Result]
    timeline: list[Event]
    load: dict[str, Any]
    observations: Observations
    history: dict[str, list[Change]]
    runs: list[Run]
    accepted: dict[str, str]
    settled_in: float
    ha: bool
    root: Path
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.holds for r in self.results)

    def failures(self) -> str:
        """The broken invariants with their examples, for an assertion message."""
        lines = []
        for r in self.results:
            if not r.holds:
                lines.append(f"{r.name}: {r.counts}")
                lines += [f"  {e}" for e in r.examples]
        lines.append(
            "timeline: " + "; ".join(f"{e.at:.1f}s {e.action} {e.target} {e.detail}" for e in self.timeline)
        )
        lines.append(f"logs in {self.root}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.name,
            "ok": self.ok,
            "ha": self.ha,
            "timeline": [e.as_dict() for e in self.timeline],
            "load": self.load,
            "observations": self.observations,
            "settled_seconds": round(self.settled_in, 2),
            "invariants": [r.as_dict() for r in self.results],
            "notes": self.notes,
        }


async def settle(h: Harness, accepted: set[str], within: float, keys: set[str]) -> tuple[float, set[str]]:
    """Wait until every accepted job is terminal (or waits on a cluster that is down) and no
    cluster runs an orphaned workload; return the time it took and the jobs to hold the run to
    (the accepted ones plus those stored for a key never confirmed)."""
    started = time.monotonic()
    deadline = started + within
    jobs = set(accepted)
    while True:
        if keys:
            specs = await history.read_specs(h.etcd_endpoint, h.settings.prefix)
            jobs = set(accepted) | {job_id for job_id, key in specs.items() if key in keys}
        statuses = await history.current_statuses(h.etcd_endpoint, h.settings.prefix)
        down = h.down_clusters()
        waiting = [
            j
            for j in jobs
            if j not in statuses or (statuses[j].state not in TERMINAL and statuses[j].cluster not in down)
        ]
        runs = await asyncio.to_thread(history.read_runs, h.ledgers)
        orphaned = invariants.orphans({j: [c] for j, c in statuses.items()}, runs)
        if (not waiting and not orphaned) or time.monotonic() > deadline:
            return time.monotonic() - started, jobs
        await asyncio.sleep(0.5)


async def run(
    scenario: Scenario,
    root: Path | None = None,
    *,
    seed: int = 0,
    settle_within: float = 30.0,
    on_event: Callable[[Event], None] | None = None,
) -> Outcome:
    """Run one scenario and check the invariants; HarnessError if the federation cannot run it."""
    root = root or Path(tempfile.mkdtemp(prefix=f"fedplane-chaos-{scenario.name}-"))
    settings = replace(scenario.settings, seed=seed)
    h = Harness(root, settings)
    params = replace(scenario.load, seed=seed)
    return await drive(
        h,
        params,
        scenario.name,
        scenario.act,
        warmup=scenario.warmup,
        cooldown=scenario.cooldown,
        settle_within=settle_within,
        on_event=on_event,
        require_ha=scenario.needs_ha,
    )


async def drive(
    h: Harness,
    params: LoadParams,
    name: str,
    act: Act,
    *,
    warmup: float,
    cooldown: float,
    settle_within: float,
    on_event: Callable[[Event], None] | None = None,
    require_ha: bool = False,
) -> Outcome:
    """Start `h`, load it, `act`, settle and check; the harness is closed on the way out."""
    observations: Observations = {}
    try:
        await h.start(on_event, require_ha=require_ha)
        load = LoadGenerator(dict(h.hub_addresses), params, run_id=f"{name}-{time.time_ns():x}")
        loading = asyncio.create_task(load.run(), name="chaos-load")
        try:
            await asyncio.sleep(warmup)
            await act(h, observations)
            await asyncio.sleep(cooldown)
        finally:
            load.stop()
            await loading
            await load.drain()
        h.record("stop load", "load generator", f"{load.summary()['accepted']} accepted")
        accepted = load.accepted()
        keys = set(load.unconfirmed_keys())
        settled_in, jobs = await settle(h, set(accepted), settle_within, keys)
        h.record("settled", "federation", f"in {settled_in:.1f}s")
        changes = await history.read_status_history(h.etcd_endpoint, h.settings.prefix)
        specs = await history.read_specs(h.etcd_endpoint, h.settings.prefix)
        runs = await asyncio.to_thread(history.read_runs, h.ledgers)
        results = invariants.check_all(
            jobs,
            changes,
            runs,
            specs=specs,
            keys=[s.key for s in load.submissions],
            waiting_on=frozenset(h.down_clusters()),
        )
        if observations.get("pauses"):
            results.append(invariants.deposed_leader_quiet(observations["pauses"]))
        if observations.get("fault_errors"):
            errors = observations["fault_errors"]
            failed = Result("every fault was carried out and healed", {"failed": len(errors)}, ("failed",))
            failed.examples = errors[: invariants.EXAMPLES]
            results.append(failed)
        return Outcome(
            name,
            results,
            list(h.timeline),
            load.summary(),
            observations,
            changes,
            runs,
            accepted,
            settled_in,
            h.ha,
            h.root,
        )
    finally:
        await h.close()


def random_act(rng: random.Random, duration: float) -> Act:
    """Faults the harness can inject (fault_menu), one after another with random targets and
    timings, until `duration` has passed. A fault that cannot be carried out (no replica takes
    over, a server does not start again) is recorded and the run goes on: the checks say what
    it cost."""

    async def act(h: Harness, obs: Observations) -> None:
        menu = fault_menu(h)
        started = time.monotonic()
        while time.monotonic() - started < duration:
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            if time.monotonic() - started >= duration:
                break
            fault = rng.choice(menu)
            try:
                await _inject(h, obs, rng, fault)
            except (HarnessError, EmbeddedError) as exc:
                h.record("fault failed", fault, str(exc).splitlines()[0])
                obs.setdefault("fault_errors", []).append(f"{fault}: {str(exc).splitlines()[0]}")

    return act


async def _inject(h: Harness, obs: Observations, rng: random.Random, fault: str) -> None:
    t = h.settings.timings
    if fault == "kill-leader":
        if h.ha and len(h.hubs) > 1:
            await kill_leader(h, obs, restart_after=rng.uniform(t.lease, t.lease * 3))
        else:
            await kill_leader(h, obs, restart_after=rng.uniform(0.2, 1.5))
    elif fault == "kill-agent":
        await kill_agent(h, obs, rng.choice(h.agent_names()), down_for=rng.uniform(0.2, 1.5))
    elif fault == "restart-nats":
        await restart_nats(h, obs, down_for=rng.uniform(0.2, 2.0))
    elif fault == "restart-etcd":
        await restart_etcd(h, obs, down_for=rng.uniform(0.2, 2.0))
    elif fault == "pause-leader":
        await pause_leader(h, obs, paused_for=rng.uniform(t.lease + 0.5, t.lease * 2 + 1))
    elif fault == "edge-short-cut":
        cut = rng.uniform(t.heartbeat * 2, max(t.heartbeat * 2, t.lost_after - 1.5))
        await cut_edge(h, obs, rng.choice(h.edge_names()), cut_for=cut)
    elif fault == "edge-long-cut":
        cut = rng.uniform(t.lost_after + t.requeue_after + 1, t.lost_after + t.requeue_after + 4)
        await cut_edge(h, obs, rng.choice(h.edge_names()), cut_for=cut)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def fault_menu(h: Harness) -> list[str]:
    """The faults this harness can inject."""
    menu = ["kill-leader", "kill-agent", "restart-nats", "restart-etcd", "pause-leader"]
    if h.links:
        menu += ["edge-short-cut", "edge-long-cut"]
    return menu

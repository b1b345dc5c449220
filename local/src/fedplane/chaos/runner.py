"""`fedplane chaos`: a local federation under random faults for a bounded time, then the checks.

The harness (hub replicas, agents, an edge site, etcd and nats-server, each a process) takes a
steady stream of submissions while faults from the scenario set follow one another with random
targets and timings drawn from the seed: kill -9 the leading hub, kill -9 an agent, restart
nats-server or etcd, pause the leader past its lease, cut the edge site's link for less or
more than its lost timeout. Each fault heals before the next. Then the federation settles and
the invariants are checked on etcd's full history and the clusters' ledgers. The run stops by
itself: its length is bounded by the duration, the longest fault and the settling time.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from fedplane.chaos import scenarios
from fedplane.chaos.load import LoadParams
from fedplane.chaos.processes import STARTUP_TIMEOUT, Event, Harness, HarnessError, Settings, Timings
from fedplane.chaos.scenarios import Outcome

__all__ = ["ChaosParams", "HarnessError", "render", "run"]

# Reading the history back and stopping everything, on top of the rest.
FINISH_ALLOWANCE = 90.0


@dataclass(frozen=True)
class ChaosParams:
    duration: float = 60.0
    seed: int = 0
    hubs: int = 2
    agents: int = 3
    edge_agents: int = 1
    rate: float = 8.0
    # How long the federation may take to finish every accepted job once the faults stop.
    settle: float = 60.0

    def problems(self) -> list[str]:
        out = []
        for name in ("duration", "rate", "settle"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                out.append(f"--{name}: must be a positive number (got {value})")
        if self.hubs < 1:
            out.append(f"--hubs: must be at least 1 (got {self.hubs})")
        if self.agents < 2:
            out.append(f"--agents: at least 2, so that a job has somewhere else to go (got {self.agents})")
        if self.edge_agents < 0:
            out.append(f"--edge-agents: must not be negative (got {self.edge_agents})")
        return out

    def bound(self) -> float:
        """The longest the run can take, all told."""
        t = Timings()
        longest_fault = t.lost_after + t.requeue_after + 4 + 10
        return 2 * STARTUP_TIMEOUT + self.duration + longest_fault + self.settle + FINISH_ALLOWANCE


async def run_async(
    params: ChaosParams, root: Path, on_event: Callable[[Event], None] | None = None
) -> Outcome:
    rng = random.Random(params.seed)
    settings = Settings(
        hubs=params.hubs, agents=params.agents, edge_agents=params.edge_agents, seed=params.seed
    )
    load = LoadParams(
        rate=params.rate,
        durations=(0.3, 3.0),
        edge_share=0.4 if params.edge_agents else 0.0,
        seed=params.seed,
    )
    harness = Harness(root, settings)
    async with asyncio.timeout(params.bound()):
        return await scenarios.drive(
            harness,
            load,
            f"random seed {params.seed}",
            scenarios.random_act(rng, params.duration),
            warmup=2.0,
            cooldown=2.0,
            settle_within=params.settle,
            on_event=on_event,
        )


def run(params: ChaosParams, on_event: Callable[[Event], None] | None = None, keep: bool = False) -> Outcome:
    """Run from the main thread (children die with the thread that started them). The work
    directory (logs, ledgers, etcd data) is removed unless `keep` or an invariant broke."""
    root = Path(tempfile.mkdtemp(prefix="fedplane-chaos-"))
    outcome: Outcome | None = None
    try:
        outcome = asyncio.run(run_async(params, root, on_event))
        return outcome
    except TimeoutError:
        raise HarnessError(f"the chaos run did not finish within {params.bound():.0f}s") from None
    finally:
        if outcome is not None and outcome.ok and not keep:
            shutil.rmtree(root, ignore_errors=True)


def describe(observations: dict[str, Any]) -> list[str]:
    """What each fault showed, one line each."""
    lines = []
    for t in observations.get("takeovers", []):
        lines.append(f"takeover: {t['to']} led {t['seconds']:.2f}s after {t['from']} was killed")
    for p in observations.get("pauses", []):
        if p.get("taken_over_by"):
            logged = "yes" if p.get("logged_stopped_leading") else "NO"
            lines.append(
                f"pause: {p['replica']} stopped {p['paused_seconds']:.1f}s, {p['taken_over_by']} took over; "
                f"resumed, it names {p.get('leader_after_resume') or 'no one'} as leader; "
                f"logged 'stopped leading': {logged}; "
                f"dispatches after it resumed: {p.get('dispatched_while_deposed', 0)}"
            )
        else:
            lines.append(f"pause: {p['replica']} stopped {p['paused_seconds']:.1f}s (no other replica)")
    for c in observations.get("cuts", []):
        lines.append(f"cut: {c['agent']} cut off for {c['seconds']:.1f}s")
    for k in observations.get("agent_kills", []):
        lines.append(f"agent kill: {k['agent']} killed with {k['workloads']} workloads in its cluster")
    return lines


def render(outcome: Outcome) -> RenderableType:
    timeline = Table(title="What the run did", header_style="bold")
    timeline.add_column("AT", justify="right")
    timeline.add_column("ACTION")
    timeline.add_column("TARGET")
    timeline.add_column("DETAIL", overflow="fold")
    for event in outcome.timeline:
        timeline.add_row(f"{event.at:.1f}s", event.action, event.target, event.detail)

    load = outcome.load
    submitted = Text(
        f"submitted {load['submitted']}, accepted {load['accepted']} "
        f"(found again on a retry: {load['found_on_retry']}), retried {load['retried']}, "
        f"rejected {load['rejected']}, unconfirmed {load['unconfirmed']}; "
        f"settled in {outcome.settled_in:.1f}s"
    )

    checks = Table(title="Invariants", header_style="bold")
    checks.add_column("INVARIANT")
    checks.add_column("HOLDS")
    checks.add_column("COUNTS", overflow="fold")
    for result in outcome.results:
        mark = Text("yes", style="green") if result.holds else Text("NO", style="bold red")
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.counts.items())
        checks.add_row(result.name, mark, counts)
    parts: list[RenderableType] = [timeline, submitted, checks]
    for result in outcome.results:
        for example in result.examples if not result.holds else []:
            parts.append(Text(f"  {result.name}: {example}", style="red"))
        for note in result.notes[:5]:
            parts.append(Text(f"  note: {note}", style="dim"))
    for line in describe(outcome.observations):
        parts.append(Text(line))
    verdict = "every invariant holds" if outcome.ok else f"invariants broken; logs in {outcome.root}"
    parts.append(Text(verdict, style="bold green" if outcome.ok else "bold red"))
    return Group(*parts)

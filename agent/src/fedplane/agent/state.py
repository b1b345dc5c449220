"""What the agent keeps in its state directory, so that a restart (at the edge, perhaps while
cut off from the hub) forgets nothing it needs to stay safe:

- generations.json: the highest generation seen per job, the idempotency record of commands;
- workloads.json: each workload's limits (max run time, fence) and when its max-run clock
  started, so that a restarted agent still stops it on time and still fences it;
- contact.json: when the agent last had a heartbeat acknowledged by JetStream, so that a
  restarted agent counts the time it has been cut off from before its restart.

Without a state directory all of it is kept in memory only. Files are replaced whole
(written beside, then renamed), so a crash leaves the old version or the new, never half.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedplane.agent.decisions import Workload


@dataclass
class Limits:
    """A workload's limits (0: none) and when its max-run clock started (wall clock; 0: not yet)."""

    max_run_seconds: int = 0
    fence_after_seconds: float = 0.0
    running_since: float = 0.0


class AgentState:
    def __init__(self, state_dir: Path | None) -> None:
        self.dir = state_dir
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        self.generations: dict[str, int] = {k: int(v) for k, v in self._read("generations.json", {}).items()}
        self.limits: dict[Workload, Limits] = {}
        for record in self._read("workloads.json", []):
            workload = (str(record.pop("job_id")), int(record.pop("generation")))
            self.limits[workload] = Limits(**record)
        # Wall-clock time of the last heartbeat JetStream acknowledged (None: never known).
        contact = self._read("contact.json", {}).get("last_contact")
        self.last_contact: float | None = float(contact) if contact is not None else None

    # ------------------------------------------------------------------ generations
    def hold(self, job_id: str, generation: int) -> None:
        self.generations[job_id] = generation
        self._write("generations.json", self.generations)

    # ------------------------------------------------------------------ limits
    def set_limits(self, workload: Workload, limits: Limits) -> None:
        self.limits[workload] = limits
        self._write_limits()

    def clock_started(self, workload: Workload, at: float) -> None:
        limits = self.limits.get(workload)
        if limits is not None and not limits.running_since:
            limits.running_since = at
            self._write_limits()

    def forget(self, workloads: list[Workload]) -> None:
        """Drop the limits of workloads that ended (or are gone)."""
        dropped = [w for w in workloads if self.limits.pop(w, None) is not None]
        if dropped:
            self._write_limits()

    def fence_limits(self) -> list[tuple[Workload, float]]:
        return [
            (w, limits.fence_after_seconds) for w, limits in self.limits.items() if limits.fence_after_seconds
        ]

    # ------------------------------------------------------------------ contact
    def contact(self, at: float) -> None:
        self.last_contact = at
        self._write("contact.json", {"last_contact": at})

    # ------------------------------------------------------------------ files
    def _write_limits(self) -> None:
        if self.dir is None:
            return  # building the list would cost as much as writing it, for every create
        self._write(
            "workloads.json",
            [
                {"job_id": job, "generation": gen, **asdict(limits)}
                for (job, gen), limits in self.limits.items()
            ],
        )

    def _read(self, name: str, empty: Any) -> Any:
        if self.dir is None or not (self.dir / name).exists():
            return empty
        return json.loads((self.dir / name).read_text())

    def _write(self, name: str, data: Any) -> None:
        if self.dir is None:
            return
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

"""What the agent keeps in its state directory, so that a restart (at the edge, perhaps while
cut off from the hub) forgets nothing it needs to stay safe:

- the highest generation seen per job, the idempotency record of commands;
- each workload's limits (max run time, fence) and when its max-run clock started, so that a
  restarted agent still stops it on time and still fences it;
- when the agent last had a heartbeat acknowledged by JetStream, so that a restarted agent
  counts the time it has been cut off from before its restart.

All of it is one append-only journal, `state.log` (see AgentState). Without a state directory
all of it is kept in memory only.
"""

from __future__ import annotations

import contextlib
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
    """The agent's durable state, kept as an append-only journal (`state.log`, JSON lines).

    Every change is one line appended, so a create costs the same whatever the cluster runs:
    rewriting whole files per create, as earlier agents did, cost time in proportion to the
    workloads held (quadratic over a busy cluster's life). Once the journal holds many more
    lines than live entries it is compacted: the live state is written beside it and renamed
    over it, so a crash leaves the old journal or the new, never half of one. Files of earlier
    agents (generations.json, workloads.json, contact.json) are read at start and folded in.
    """

    def __init__(self, state_dir: Path | None) -> None:
        self.dir = state_dir
        self.generations: dict[str, int] = {}
        self.limits: dict[Workload, Limits] = {}
        # Wall-clock time of the last heartbeat JetStream acknowledged (None: never known).
        self.last_contact: float | None = None
        self._lines = 0
        self._file: Any = None
        if state_dir is None:
            return
        state_dir.mkdir(parents=True, exist_ok=True)
        self._read_legacy(state_dir)
        journal = state_dir / _JOURNAL
        if journal.exists():
            for line in journal.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                    self._apply(json.loads(line))
                self._lines += 1
        self._compact()

    # ------------------------------------------------------------------ generations
    def hold(self, job_id: str, generation: int) -> None:
        self.generations[job_id] = generation
        self._append({"hold": [job_id, generation]})

    # ------------------------------------------------------------------ limits
    def set_limits(self, workload: Workload, limits: Limits) -> None:
        self.limits[workload] = limits
        self._append({"limits": [*workload, asdict(limits)]})

    def clock_started(self, workload: Workload, at: float) -> None:
        limits = self.limits.get(workload)
        if limits is not None and not limits.running_since:
            limits.running_since = at
            self._append({"limits": [*workload, asdict(limits)]})

    def forget(self, workloads: list[Workload]) -> None:
        """Drop the limits of workloads that ended (or are gone)."""
        dropped = [w for w in workloads if self.limits.pop(w, None) is not None]
        if dropped:
            self._append({"forget": [list(w) for w in dropped]})

    def fence_limits(self) -> list[tuple[Workload, float]]:
        return [
            (w, limits.fence_after_seconds) for w, limits in self.limits.items() if limits.fence_after_seconds
        ]

    # ------------------------------------------------------------------ contact
    def contact(self, at: float) -> None:
        self.last_contact = at
        self._append({"contact": at})

    # ------------------------------------------------------------------ the journal
    def _apply(self, entry: dict[str, Any]) -> None:
        if "hold" in entry:
            job_id, generation = entry["hold"]
            self.generations[str(job_id)] = int(generation)
        elif "limits" in entry:
            job_id, generation, limits = entry["limits"]
            self.limits[(str(job_id), int(generation))] = Limits(**limits)
        elif "forget" in entry:
            for job_id, generation in entry["forget"]:
                self.limits.pop((str(job_id), int(generation)), None)
        elif "contact" in entry:
            self.last_contact = float(entry["contact"])

    def _append(self, entry: dict[str, Any]) -> None:
        if self.dir is None:
            return
        if self._file is None:
            self._file = (self.dir / _JOURNAL).open("ab", buffering=0)
        self._file.write((json.dumps(entry, separators=(",", ":")) + "\n").encode())
        self._lines += 1
        if self._lines > 4 * (len(self.generations) + len(self.limits)) + _COMPACT_SLACK:
            self._compact()

    def _snapshot(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = [{"hold": [j, g]} for j, g in self.generations.items()]
        entries += [{"limits": [j, g, asdict(limits)]} for (j, g), limits in self.limits.items()]
        if self.last_contact is not None:
            entries.append({"contact": self.last_contact})
        return entries

    def _compact(self) -> None:
        assert self.dir is not None
        if self._file is not None:
            self._file.close()
            self._file = None
        entries = self._snapshot()
        path = self.dir / _JOURNAL
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries))
        os.replace(tmp, path)
        self._lines = len(entries)
        for legacy in _LEGACY:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / legacy).unlink()

    def _read_legacy(self, state_dir: Path) -> None:
        """The files earlier agents wrote, folded in once (the journal, written after, wins)."""
        generations = _read_json(state_dir / "generations.json", {})
        self.generations.update({str(k): int(v) for k, v in generations.items()})
        for record in _read_json(state_dir / "workloads.json", []):
            workload = (str(record.pop("job_id")), int(record.pop("generation")))
            self.limits[workload] = Limits(**record)
        contact = _read_json(state_dir / "contact.json", {}).get("last_contact")
        if contact is not None:
            self.last_contact = float(contact)


_JOURNAL = "state.log"
_LEGACY = ("generations.json", "workloads.json", "contact.json")
# Journal lines allowed beyond four per live entry before it is compacted.
_COMPACT_SLACK = 1024


def _read_json(path: Path, empty: Any) -> Any:
    if not path.exists():
        return empty
    return json.loads(path.read_text())

"""The audit log: one structured line per denied call and per mutating call, on logger
"fedplane.audit", so an operator can answer who did what to which job or cluster.

The server's interceptor writes the line when the call ends, whatever its outcome; the
servicers add what they touched (job ids, queues, cluster) and, when they refuse within a
queue, why. Denied calls are warnings and allowed ones info lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from fedplane.runtime import logs

LOGGER = "fedplane.audit"
log = logs.get(LOGGER)
# At most this many job ids in one line; a batch's line says how many there were.
MAX_IDS = 20


@dataclass
class CallNotes:
    """What a servicer tells the audit line about its call."""

    fields: dict[str, Any] = field(default_factory=dict)
    denied: str = ""


_notes: ContextVar[CallNotes | None] = ContextVar("fedplane_audit_notes", default=None)


def begin() -> tuple[CallNotes, Any]:
    notes = CallNotes()
    return notes, _notes.set(notes)


def end(token: Any) -> None:
    _notes.reset(token)


def note(**fields: Any) -> None:
    """Add fields to the current call's audit line (ignored outside a served call)."""
    notes = _notes.get()
    if notes is not None:
        notes.fields.update(fields)


def note_jobs(job_ids: Iterable[str]) -> None:
    """The jobs a call touched: the id of one, or the first MAX_IDS of a batch (with `count`)."""
    ids = list(job_ids)
    if len(ids) == 1:
        note(job_id=ids[0])
    else:
        note(job_ids=ids[:MAX_IDS])


def deny(reason: str) -> None:
    """Mark the current call as denied by authorization (the caller gets its own answer)."""
    notes = _notes.get()
    if notes is not None:
        notes.denied = reason


def write(
    *, who: str, authenticated_by: str, method: str, decision: str, code: str, reason: str = "", **fields: Any
) -> None:
    line = {"who": who, "authenticated_by": authenticated_by, "method": method, "decision": decision}
    line["code"] = code
    if reason:
        line["reason"] = reason
    if decision == "denied":
        log.warning("audit", logger=LOGGER, **line, **fields)
    else:
        log.info("audit", logger=LOGGER, **line, **fields)

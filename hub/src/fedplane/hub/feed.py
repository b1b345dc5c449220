"""The hub's watch on its own status keys: the table's second source, and the event log's.

Whatever wrote a status (this hub, an earlier one, a racing one), the change arrives here in
revision order. The table merges it (it may already hold it, from its own write) and the
event log, which feeds WatchJobs, records it; so the log's revision means that every change
up to it is in the table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fedplane.core import dispatch as sm
from fedplane.hub.events import Change, EventLog
from fedplane.hub.table import JobRecord, JobTable
from fedplane.runtime import logs
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = sm.S


class StatusFeed:
    def __init__(self, table: JobTable, events: EventLog) -> None:
        self.table = table
        self.events = events

    async def run(self, stopping: Callable[[], bool]) -> None:
        """Follow the status keys from the event log's revision on, resuming after errors."""
        table, events = self.table, self.events
        while not stopping():
            try:
                async for revision, job_id, blob in table.store.watch_statuses(events.revision, deletes=True):
                    if not blob:
                        # Deleted (retention, on the leader): every replica forgets it.
                        gone = table.jobs.get(job_id)
                        if gone is not None:
                            table.forget(gone)
                        events.revision = max(events.revision, revision)
                        continue
                    record = table.jobs.get(job_id)
                    if record is None:
                        creating = table.creating.get(job_id)
                        if creating is not None:
                            # Our own submit, its transaction's reply not yet handled: the record
                            # is at hand (created at this revision), no need to read it back.
                            record = table.add(creating.stored_at(revision), creating.request)
                        else:
                            loaded = await table.store.read_job(job_id)
                            if loaded is None:
                                continue
                            record = table.add(JobRecord.stored(loaded))
                            if record.state == S.PENDING:
                                table.wake.set()  # submitted through another replica
                    if revision > record.revision:
                        table.merge(job_id, pb.JobStatus.FromString(blob), revision, blob)
                    events.publish(Change(revision, job_id, record.queue, blob))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("status watch interrupted; resuming", error=str(exc), revision=events.revision)
                await asyncio.sleep(0.5)

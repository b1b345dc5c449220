"""Retention: finished jobs (and their idempotency keys) are deleted a while after they finish,
so that etcd and the table do not grow without bound. A deletion compares the status key's
revision, so a job that changed since it was judged is never deleted."""

from __future__ import annotations

from fedplane.core import dispatch as sm
from fedplane.hub.clock import Clock
from fedplane.hub.table import JobTable
from fedplane.runtime import logs

log = logs.get("fedplane.hub")


class Retention:
    def __init__(self, table: JobTable, clock: Clock, retention_seconds: float) -> None:
        self.table = table
        self.clock = clock
        # 0 keeps finished jobs for ever.
        self.retention = retention_seconds

    async def run(self) -> None:
        retention = self.retention
        if retention <= 0:
            return
        while True:
            await self.clock.sleep(max(1.0, min(retention / 4, 300.0)))
            try:
                await self.forget_finished(self.clock.time() - retention)
            except Exception as exc:
                log.warning("finished-job cleanup failed; will retry", error=str(exc))

    async def forget_finished(self, finished_before: float) -> int:
        """Delete jobs that finished before `finished_before` (seconds since the epoch)."""
        old = [
            r
            for r in self.table.jobs.values()
            if sm.is_terminal(r.state) and r.status.finish_time.ToNanoseconds() / 1e9 < finished_before
        ]
        deleted = await self.table.delete(old)
        if deleted:
            log.info("finished jobs deleted", count=deleted)
        return deleted

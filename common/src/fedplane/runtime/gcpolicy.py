"""Garbage-collector settings for the long-running daemons (hub, agent, benchmark fleet).

CPython's defaults collect the young generation every 700 net allocations and, as the heap
grows, run full collections that walk every live object. A hub holds a record per job (a
million when the queue is deep) and allocates a few hundred objects per job: with the defaults
a tenth of its CPU went to the collector, in pauses of over 100 ms once twenty thousand jobs
were held. Reference cycles are rare in what the services keep (records, bytes, protobuf), so
collecting less often costs little memory.
"""

from __future__ import annotations

import gc

# Net allocations between young collections (CPython's default is 700).
YOUNG_THRESHOLD = 50_000


def for_daemon() -> None:
    gc.set_threshold(YOUNG_THRESHOLD, 20, 10)


def settle() -> None:
    """Move what is alive now (state loaded at start-up) out of the collector's sight for good.

    Objects frozen here are still freed by reference counting when dropped; only a reference
    cycle among them would outlive its use.
    """
    gc.freeze()

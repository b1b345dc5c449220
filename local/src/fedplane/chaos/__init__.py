"""Chaos runs: a federation of separate processes on loopback, faults injected while jobs flow,
and invariants checked afterwards from etcd's full history and the simulated clusters' ledgers.

processes (the harness), load (the submission stream), history (what etcd and the ledgers
say happened), invariants (the pure checks), scenarios (faults and the named scenarios),
runner (`fedplane chaos`: random faults for a bounded time).
"""

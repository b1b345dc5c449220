"""The pure, synchronous, deterministic core: placement and the dispatch state machine.

Nothing here performs I/O or imports gRPC, NATS, etcd or Kubernetes; the hub feeds it
snapshots and events and acts on the decisions it returns.
"""

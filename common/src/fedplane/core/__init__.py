"""The pure, synchronous, deterministic core: placement and the dispatch state machine.

Nothing here performs I/O or imports gRPC, NATS, etcd, Kubernetes or the wire messages
(fedplane.v1): the core speaks its own plain types, the hub converts at its edge, feeds it
snapshots and events and acts on the decisions it returns.
"""

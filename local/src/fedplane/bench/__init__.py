"""Benchmarks that print figures: `fedplane bench` (a whole federation on real etcd and
nats-server, driven from outside), placement alone, the in-process runs and the scaling curves.

`fedplane bench` runs three processes besides etcd and NATS, so each one's CPU and memory can
be told apart: the hub, started exactly as an operator would; `fleet`, K simulated member
clusters sharing one Python process; and `loadgen`, the gRPC client that submits jobs and
measures latencies. `federation.run` is the orchestrator the CLI calls; `report` renders its
result. `run` and `scaling` are the smaller benchmarks and the curves in docs/performance.md;
`pace` is the steady submission rate the failover bench and the chaos runs share.
"""

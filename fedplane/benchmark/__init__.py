"""`fedplane bench`: a whole federation on real etcd and nats-server, driven from outside.

Three processes besides etcd and NATS, so each one's CPU and memory can be told apart:

- the hub, started exactly as an operator would (`python -m fedplane hub -c hub.yaml`);
- `fleet`: K simulated member clusters, each a full agent with its own NATS connection,
  sharing one Python process;
- `loadgen`: the gRPC client that submits jobs and measures latencies.

`federation.run` is the orchestrator the CLI calls; `report` renders its result.
"""

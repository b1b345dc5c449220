"""What the hub and agent daemons share at run time: the NATS bus, configuration, structured
logs, telemetry, task helpers, clocks and garbage-collection policy."""

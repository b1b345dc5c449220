"""A federation on one machine: real etcd and nats-server processes (`servers`) and the
local federation that `fedplane up` runs (`federation`)."""

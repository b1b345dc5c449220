"""Generated protobuf and gRPC stubs (tools/genproto.py); do not edit."""

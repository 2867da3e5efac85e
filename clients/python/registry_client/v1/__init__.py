"""Generated protobuf and gRPC stubs for registry.v1 (see ``make proto``)."""

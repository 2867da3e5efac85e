"""The node-registry sidecar: a gRPC service over Redis with a lock-free local replica."""

__version__ = "0.1.0"

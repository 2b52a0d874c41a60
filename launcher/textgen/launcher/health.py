"""Shard readiness: a shard is ready once it answers the gRPC Health RPC."""

from __future__ import annotations

import os

import grpc

from textgen.proto import generate_pb2, generate_pb2_grpc

HEALTH_RPC_TIMEOUT_S = 5.0


def grpc_health_probe(uds_path: str) -> bool:
    """True when the shard on `uds_path` answers Health; False while it is still starting."""
    if not os.path.exists(uds_path):
        return False  # not bound yet; spare a connection attempt
    with grpc.insecure_channel(f"unix://{uds_path}") as channel:
        stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
        try:
            stub.Health(generate_pb2.HealthRequest(), timeout=HEALTH_RPC_TIMEOUT_S)
        except grpc.RpcError:
            return False
    return True

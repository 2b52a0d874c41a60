"""Errors the servicer turns into gRPC status codes."""


class InvalidRequestError(ValueError):
    """The router sent something this shard cannot run (INVALID_ARGUMENT)."""


class NotReadyError(RuntimeError):
    """The RPC needs state the shard does not have yet, e.g. no Warmup (FAILED_PRECONDITION)."""

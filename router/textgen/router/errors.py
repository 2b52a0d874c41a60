"""Errors the router answers with, in TGI's JSON shape and status codes."""

from __future__ import annotations


class RouterError(Exception):
    """An error a client sees: `{"error": message, "error_type": error_type}` with `status`."""

    status = 500
    error_type = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def headers(self) -> dict[str, str]:
        return {}


class ValidationError(RouterError):
    status = 422
    error_type = "validation"


class JsonSyntaxError(RouterError):
    """The body is not JSON (TGI's JSON extractor answers 400)."""

    status = 400
    error_type = "validation"


class PayloadTooLargeError(RouterError):
    status = 413
    error_type = "payload_too_large"


class OverloadedError(RouterError):
    status = 429
    error_type = "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class GenerationError(RouterError):
    """The shards failed a step that the request took part in."""

    status = 424
    error_type = "generation"


class UnhealthyError(RouterError):
    status = 503
    error_type = "unhealthy"

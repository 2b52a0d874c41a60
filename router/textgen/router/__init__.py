"""textgen.router: HTTP, validation, queueing, continuous batching and streaming."""

__version__ = "0.1.0"

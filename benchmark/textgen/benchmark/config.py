"""The serving benchmark's configuration: one frozen dataclass, checked once."""

import json
from dataclasses import dataclass

from textgen.benchmark.apis import APIS


@dataclass(frozen=True)
class ServingConfig:
    """What `textgen-benchmark serving` sends, and to whom. CLI defaults come from here."""

    url: str = "http://127.0.0.1:8080"
    api: str = "tgi"  # a key of APIS
    model: str = "textgen"  # the "model" field of OpenAI requests
    concurrency: tuple[int, ...] = (1, 16)  # levels, run in turn
    num_requests: int | None = None  # per level; None: max(2 * concurrency, 4)
    max_new_tokens: int = 64
    prompt_tokens: int = 32  # approximate: one word per token
    seed: int = 0
    warmup: int = 1  # requests sent before each level and not measured
    timeout: float = 120.0  # seconds an HTTP operation may wait (connect, read, write)
    watermark: bool = False  # every request asks for the watermark (tgi api only)
    request_rates: tuple[float, ...] = ()  # when set: open-loop levels at these requests/s
    plot: str | None = None  # PNG path of throughput and latency against load
    shared_prefix_tokens: int = 0  # every prompt starts with the same words (a system prompt)
    chat_turns: int = 0  # when set: each worker is a user resending its history every turn
    extra_body: str = ""  # a JSON object merged into every request body (a peer's own fields)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.api not in APIS:
            raise ValueError(f"api must be one of {sorted(APIS)}, got {self.api!r}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.max_new_tokens < 1 or self.prompt_tokens < 1:
            raise ValueError("max_new_tokens and prompt_tokens must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if any(rate <= 0 for rate in self.request_rates):
            raise ValueError(f"request rates must be > 0, got {self.request_rates}")
        if self.watermark and self.api != "tgi":
            raise ValueError("watermark needs the tgi api")
        if self.shared_prefix_tokens < 0 or self.chat_turns < 0:
            raise ValueError("shared_prefix_tokens and chat_turns must be >= 0")
        if self.extra_body and not isinstance(json.loads(self.extra_body), dict):
            raise ValueError("extra_body must be a JSON object")
        if self.chat_turns and self.request_rates:
            raise ValueError("chat_turns runs closed-loop users: not with request rates")

    @property
    def extra_fields(self) -> dict:
        return json.loads(self.extra_body) if self.extra_body else {}

    def num_requests_for(self, concurrency: int) -> int:
        """Measured requests at one concurrency level (a chat: every user's every turn)."""
        if self.chat_turns:
            return concurrency * self.chat_turns
        if self.num_requests is not None:
            return self.num_requests
        return max(2 * concurrency, 4)

    def num_requests_at_rate(self, rate: float) -> int:
        """Measured requests at one request rate: about 10 s of arrivals, at least 4."""
        if self.num_requests is not None:
            return self.num_requests
        return max(round(10 * rate), 4)

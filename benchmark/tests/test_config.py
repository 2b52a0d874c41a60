import pytest

from textgen.benchmark.config import ServingConfig


def test_num_requests_default_to_twice_the_concurrency_and_at_least_4():
    config = ServingConfig()
    assert [config.num_requests_for(c) for c in (1, 2, 3, 16)] == [4, 4, 6, 32]
    assert ServingConfig(num_requests=3).num_requests_for(16) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "127.0.0.1:8080"},
        {"api": "grpc"},
        {"concurrency": ()},
        {"concurrency": (1, 0)},
        {"num_requests": 0},
        {"max_new_tokens": 0},
        {"prompt_tokens": 0},
        {"warmup": -1},
        {"timeout": 0.0},
        {"watermark": True, "api": "openai"},
    ],
)
def test_invalid_configs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ServingConfig(**kwargs)

import json

import pytest

from textgen.benchmark.apis import APIS, StreamEvent, TgiApi


def test_tgi_request_body():
    body = APIS["tgi"].request_body("hello there", max_new_tokens=7, model="ignored")
    assert body == {
        "inputs": "hello there",
        "parameters": {"max_new_tokens": 7, "ignore_eos_token": True, "do_sample": False},
    }


def test_openai_request_body():
    body = APIS["openai"].request_body("hello there", max_new_tokens=7, model="m")
    assert body == {
        "model": "m",
        "prompt": "hello there",
        "max_tokens": 7,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }


def _tgi_token(generated_text: str | None) -> str:
    token = {"id": 5, "text": " a", "logprob": -0.1, "special": False}
    event = {"index": 1, "token": token, "generated_text": generated_text, "details": None}
    return json.dumps(event)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_tgi_token(None), StreamEvent(has_token=True, text=" a")),
        (_tgi_token("a b"), StreamEvent(has_token=True, done=True, text=" a")),
        ('{"error": "oom", "error_type": "generation"}', StreamEvent(error="generation: oom")),
    ],
)
def test_tgi_parse_event(data, expected):
    assert APIS["tgi"].parse_event(data) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"choices": [{"index": 0, "text": " a"}]}', StreamEvent(has_token=True, text=" a")),
        ('{"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}', StreamEvent()),
        ('{"choices": [], "usage": {"completion_tokens": 9}}', StreamEvent(usage_tokens=9)),
        ("[DONE]", StreamEvent(done=True)),
        ('{"error": {"message": "bad", "type": "invalid"}}', StreamEvent(error="invalid: bad")),
    ],
)
def test_openai_parse_event(data, expected):
    assert APIS["openai"].parse_event(data) == expected


@pytest.mark.parametrize("api", sorted(APIS))
@pytest.mark.parametrize("data", ["not json", "[1, 2]"])
def test_parse_event_rejects_what_is_not_a_json_object(api, data):
    with pytest.raises(ValueError):
        APIS[api].parse_event(data)


def test_tgi_request_body_with_watermark():
    body = TgiApi(watermark=True).request_body("hello", max_new_tokens=7, model="ignored")
    assert body["parameters"]["watermark"] is True

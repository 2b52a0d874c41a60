"""Grammar guidance against the real server and the real model: every sampled output of every
schema and regex validates; grammars work with stop, length, streaming and unconstrained
neighbours; bad grammars are refused; OpenAI's response_format and tools through the SDK."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from launcher_process import start_launcher, stop_launcher

pytestmark = pytest.mark.integration

SEEDS = range(8)


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


NAME = {"type": "string", "minLength": 1, "maxLength": 12}


def closed(schema: dict) -> dict:
    """Every object of the schema without additional properties: the tiny model's output
    stays short enough to finish (an open object lets it add keys until max_new_tokens)."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if schema.get("type") == "object":
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed(item) for item in schema]
    return schema


SCHEMAS_AS_WRITTEN = {
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": NAME,
                    "address": {
                        "type": "object",
                        "properties": {"city": NAME},
                        "required": ["city"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["person"],
    },
    "array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": ["S", "M", "L"]},
        },
        "required": ["color", "size"],
    },
    "bounded-numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["age", "score"],
    },
    "optional": {
        "type": "object",
        "properties": {
            "name": NAME,
            "nickname": NAME,
            "age": {"type": "integer", "minimum": 1, "maximum": 99},
        },
        "required": ["name"],
        "additionalProperties": False,
    },
    "any-of": {
        "type": "object",
        "properties": {
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 9},
                    {"type": "boolean"},
                    NAME,
                ]
            }
        },
        "required": ["value"],
    },
}
SCHEMAS = {name: closed(schema) for name, schema in SCHEMAS_AS_WRITTEN.items()}
REGEXES = {
    "date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "email": r"[a-z]{1,10}@[a-z]{1,10}\.(com|org|net)",
    "phone": r"\+1 \(\d{3}\) \d{3}-\d{4}",
}
MAX_NEW_TOKENS = 120


def body(inputs: str, grammar: dict, **parameters) -> dict:
    parameters = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "details": True,
        "grammar": grammar,
        **parameters,
    }
    return {"inputs": inputs, "parameters": parameters}


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))


def sampled(seed: int) -> dict:
    return {"do_sample": True, "temperature": 1.0, "seed": seed}


def test_every_sampled_output_validates_against_its_json_schema(launcher):
    cases = [(name, seed) for name in SCHEMAS for seed in SEEDS]
    bodies = [
        body(
            chat(f"Answer with JSON ({name})."),
            {"type": "json", "value": SCHEMAS[name]},
            **sampled(seed),
        )
        for name, seed in cases
    ]
    responses = asyncio.run(post_all(launcher.url, bodies))
    for (name, seed), response in zip(cases, responses, strict=True):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["details"]["finish_reason"] == "eos_token", (name, seed, answer)
        jsonschema.validate(json.loads(answer["generated_text"]), SCHEMAS[name])


def test_every_sampled_output_fullmatches_its_regex(launcher):
    cases = [(name, seed) for name in REGEXES for seed in SEEDS]
    bodies = [
        body(chat(f"Give me a {name}."), {"type": "regex", "value": REGEXES[name]}, **sampled(seed))
        for name, seed in cases
    ]
    responses = asyncio.run(post_all(launcher.url, bodies))
    for (name, seed), response in zip(cases, responses, strict=True):
        answer = response.json()
        assert answer["details"]["finish_reason"] == "eos_token", (name, seed, answer)
        assert re.fullmatch(REGEXES[name], answer["generated_text"]), (name, answer)


def test_json_object_alias_and_schema_as_a_string(launcher):
    schema = SCHEMAS["enum"]
    for grammar in (
        {"type": "json_object", "value": schema},
        {"type": "json", "value": json.dumps(schema)},
    ):
        answer = httpx.post(
            launcher.url + "/generate", json=body(chat("JSON please"), grammar), timeout=120
        ).json()
        jsonschema.validate(json.loads(answer["generated_text"]), schema)


def test_a_grammar_cut_short_by_length_ends_with_length(launcher):
    grammar = {"type": "regex", "value": "[a-z]{30}"}
    answer = httpx.post(
        launcher.url + "/generate",
        json=body(chat("Letters."), grammar, max_new_tokens=3),
        timeout=120,
    ).json()
    assert answer["details"]["finish_reason"] == "length"
    assert answer["details"]["generated_tokens"] == 3
    assert re.fullmatch("[a-z]{1,29}", answer["generated_text"])


def test_grammar_with_a_stop_sequence_stops_there(launcher):
    grammar = {"type": "regex", "value": r"(yes|no), because [a-z ]{5,40}\."}
    answer = httpx.post(
        launcher.url + "/generate",
        json=body(chat("Is the sky blue?"), grammar, stop=["because"]),
        timeout=120,
    ).json()
    assert answer["details"]["finish_reason"] == "stop_sequence"
    assert re.fullmatch(r"(yes|no), because", answer["generated_text"])


def test_streamed_grammar_output_is_the_same_valid_text(launcher):
    schema = SCHEMAS["nested"]
    request = body(chat("A person as JSON."), {"type": "json", "value": schema}, **sampled(3))
    streamed, final = "", None
    with httpx.stream(
        "POST", launcher.url + "/generate_stream", json=request, timeout=120
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                streamed += "" if event["token"]["special"] else event["token"]["text"]
                final = event
    assert final["details"]["finish_reason"] == "eos_token"
    assert streamed == final["generated_text"]
    jsonschema.validate(json.loads(streamed), schema)
    again = httpx.post(launcher.url + "/generate", json=request, timeout=120).json()
    assert again["generated_text"] == streamed  # the seed reproduces it


def test_unconstrained_requests_batched_with_constrained_ones_are_unchanged(launcher):
    free = {"inputs": chat("Name a fruit."), "parameters": {"max_new_tokens": 20}}
    alone = httpx.post(launcher.url + "/generate", json=free, timeout=120).json()["generated_text"]
    constrained = [
        body(chat("Date?"), {"type": "regex", "value": REGEXES["date"]}, **sampled(seed))
        for seed in range(4)
    ]
    responses = asyncio.run(post_all(launcher.url, [*constrained, free, *constrained]))
    assert responses[4].json()["generated_text"] == alone
    for response in responses[:4] + responses[5:]:
        assert re.fullmatch(REGEXES["date"], response.json()["generated_text"])


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ({"type": "regex", "value": "(unclosed"}, "invalid regex"),
        (
            {"type": "json", "value": {"type": "object", "properties": {"a": {"type": "nope"}}}},
            "nope",
        ),
        (
            {"type": "json", "value": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}},
            "`$ref` cycle",
        ),
        (
            {
                "type": "json",
                "value": {
                    "type": "object",
                    "properties": {f"p{i}": {"type": "string"} for i in range(20_000)},
                },
            },
            "over the budget",
        ),
    ],
    ids=["regex", "schema", "ref-cycle", "over-budget"],
)
def test_bad_grammars_are_refused_with_422(launcher, grammar, message):
    response = httpx.post(launcher.url + "/generate", json=body("Hi", grammar), timeout=120)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    assert message in response.json()["error"]


# --- OpenAI ---

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": NAME},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(launcher):
    return openai.OpenAI(base_url=launcher.url + "/v1", api_key="-", max_retries=0)


def test_openai_json_schema_response_format(client):
    schema = SCHEMAS["optional"]
    for seed in range(3):
        completion = client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=MAX_NEW_TOKENS,
            seed=seed,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": schema, "strict": True},
            },
        )
        assert completion.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(completion.choices[0].message.content), schema)


def test_openai_json_object_response_format(client):
    completion = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=MAX_NEW_TOKENS,
        seed=1,
        response_format={"type": "json_object"},
    )
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(completion.choices[0].message.content), dict)
    else:
        assert completion.choices[0].message.content.startswith("{")


def test_openai_named_tool_call(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        completion = client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            seed=seed,
            max_tokens=MAX_NEW_TOKENS,
        )
        answer = completion.choices[0]
        assert answer.finish_reason == "tool_calls"
        (call,) = answer.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_openai_required_tool_call(client):
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
    for seed in range(3):
        completion = client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            tools=[WEATHER, TIME],
            tool_choice="required",
            seed=seed,
            max_tokens=MAX_NEW_TOKENS,
        )
        answer = completion.choices[0]
        assert answer.finish_reason == "tool_calls"
        (call,) = answer.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_openai_streamed_tool_call_deltas_add_up(client):
    stream = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice="required",
        seed=2,
        max_tokens=MAX_NEW_TOKENS,
        stream=True,
    )
    name, arguments, finish = None, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            name = call.function.name or name
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, finish) == ("get_weather", "tool_calls")
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_openai_auto_tool_choice_answers_with_text_or_a_valid_call(client):
    for seed in range(3):
        completion = client.chat.completions.create(
            model="m", messages=MESSAGES, tools=[WEATHER], seed=seed, max_tokens=MAX_NEW_TOKENS
        )
        answer = completion.choices[0]
        if answer.message.tool_calls:
            assert answer.finish_reason == "tool_calls"
            jsonschema.validate(
                json.loads(answer.message.tool_calls[0].function.arguments),
                WEATHER["function"]["parameters"],
            )
        else:
            assert answer.finish_reason in ("stop", "length") and isinstance(
                answer.message.content, str
            )


def test_disable_grammar_support_refuses_as_tgi(tmp_path, model_dir):
    own = start_launcher(tmp_path, "--disable-grammar-support")
    try:
        response = httpx.post(
            own.url + "/generate", json=body("Hi", {"type": "regex", "value": "a"}), timeout=60
        )
        assert response.status_code == 422
        assert response.json() == {
            "error": "Input validation error: grammar is not supported",
            "error_type": "validation",
        }
        sdk = openai.OpenAI(base_url=own.url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.UnprocessableEntityError, match="grammar is not supported"):
            sdk.chat.completions.create(
                model="m", messages=MESSAGES, response_format={"type": "json_object"}
            )
    finally:
        stop_launcher(own)

"""TGI's generate API against the fake shard: every bad request gets TGI's status, error_type
and message (as an HTTP error or, for validation on a stream, as an error event), and
every parameter whose effect the router owns changes the answer as it should."""

from __future__ import annotations

import json

import pytest
from router_fakes import EOS, tokenizer_info
from test_http import router

from textgen.proto import generate_pb2 as pb
from textgen.router.allocator import BlockAllocator
from textgen.router.best_of import pick_best
from textgen.router.request import (
    Entry,
    SamplingParams,
    StoppingParams,
    StreamEvent,
    Token,
    ValidRequest,
)
from textgen.router.scheduler import PrefillChunk, _to_proto
from textgen.router.stop import StopSequenceMatcher

HTTP = "http"  # the stream answers with the same HTTP error as /generate
EVENT = "event"  # the stream answers 200 with one error event

P = "parameters"


def params(**kwargs) -> dict:
    return {"inputs": "Hi", P: kwargs}


# (id, body (dict/list/...) or raw bytes, /generate status, stream behaviour, message part)
BAD_REQUESTS = [
    ("body-list", [1, 2], 422, HTTP, "invalid type: sequence, expected an object"),
    ("body-string", "hello", 422, HTTP, "expected an object"),
    ("body-null", None, 422, HTTP, "invalid type: null, expected an object"),
    ("no-inputs", {P: {}}, 422, HTTP, "missing field `inputs`"),
    ("inputs-int", {"inputs": 5}, 422, HTTP, "inputs: invalid type: integer `5`, expected a"),
    ("params-list", {"inputs": "Hi", P: []}, 422, HTTP, "parameters: invalid type: sequence"),
    ("max-new-str", params(max_new_tokens="5"), 422, HTTP, 'invalid type: string "5", expected'),
    ("max-new-neg", params(max_new_tokens=-1), 422, HTTP, "integer `-1`, expected u32"),
    ("max-new-u32", params(max_new_tokens=2**32), 422, HTTP, "expected u32"),
    ("max-new-float", params(max_new_tokens=5.5), 422, HTTP, "floating point `5.5`, expected"),
    ("seed-neg", params(seed=-1), 422, HTTP, "integer `-1`, expected u64"),
    ("seed-u64", params(seed=2**64), 422, HTTP, "expected u64"),
    ("top-k-i32", params(top_k=2**31), 422, HTTP, "expected i32"),
    ("temp-str", params(temperature="hot"), 422, HTTP, "temperature: invalid type: string"),
    ("temp-bool", params(temperature=True), 422, HTTP, "boolean `true`, expected f32"),
    ("temp-1e999", b'{"inputs":"Hi","parameters":{"temperature":1e999}}', 422, HTTP, "f32"),
    ("temp-nan", b'{"inputs":"Hi","parameters":{"temperature":NaN}}', 400, HTTP, "NaN"),
    ("temp-inf", b'{"inputs":"Hi","parameters":{"top_p":Infinity}}', 400, HTTP, "Infinity"),
    ("not-json", b"{not json", 400, HTTP, "Failed to parse the request body as JSON"),
    ("not-utf8", b'{"inputs":"\xff"}', 400, HTTP, "Failed to parse"),
    ("stop-str", params(stop="abc"), 422, HTTP, "stop: invalid type: string"),
    ("stop-int", params(stop=[1]), 422, HTTP, "stop: invalid type: integer `1`"),
    ("details-str", params(details="yes"), 422, HTTP, "details: invalid type: string"),
    ("adapter-int", params(adapter_id=5), 422, HTTP, "adapter_id: invalid type"),
    ("empty-inputs", {"inputs": ""}, 422, EVENT, "`inputs` cannot be empty"),
    ("temp-0", params(temperature=0), 422, EVENT, "`temperature` must be strictly positive"),
    ("temp-neg", params(temperature=-1.5), 422, EVENT, "`temperature` must be strictly positive"),
    ("rep-0", params(repetition_penalty=0), 422, EVENT, "`repetition_penalty` must be strictly"),
    ("freq-high", params(frequency_penalty=2.5), 422, EVENT, "`frequency_penalty` must be >= -2.0"),
    ("freq-low", params(frequency_penalty=-3), 422, EVENT, "and <= 2.0"),
    ("top-p-0", params(top_p=0), 422, EVENT, "`top_p` must be > 0.0 and < 1.0"),
    ("top-p-1", params(top_p=1.0), 422, EVENT, "`top_p` must be > 0.0 and < 1.0"),
    ("typical-p", params(typical_p=1.5), 422, EVENT, "`typical_p` must be > 0.0 and < 1.0"),
    ("top-k-0", params(top_k=0), 422, EVENT, "`top_k` must be strictly positive"),
    ("top-k-neg", params(top_k=-5), 422, EVENT, "`top_k` must be strictly positive"),
    ("max-new-0", params(max_new_tokens=0), 422, EVENT, "`max_new_tokens` must be strictly"),
    ("stop-many", params(stop=["a", "b", "c"]), 422, EVENT, "up to 2 stop sequences. Given: 3"),
    ("stop-empty", params(stop=[""]), 422, EVENT, "`stop` sequences cannot be empty"),
    ("top-n", params(top_n_tokens=6), 422, EVENT, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ("truncate-0", params(truncate=0), 422, EVENT, "`truncate` must be strictly positive"),
    ("truncate-big", params(truncate=33), 422, EVENT, "less than 32. Given: 33"),
    ("input-long", {"inputs": "x" * 40}, 422, EVENT, "must have less than 32 tokens. Given: 40"),
    (
        "total-tokens",
        params(max_new_tokens=63),
        422,
        EVENT,
        "must be <= 64. Given: 2 `inputs` tokens and 63 `max_new_tokens`",
    ),
    ("presence", params(presence_penalty=3), 422, EVENT, "`presence_penalty` must be >= -2.0"),
    ("min-p", params(min_p=1.5), 422, EVENT, "`min_p` must be >= 0.0 and <= 1.0"),
    ("min-new", params(min_new_tokens=9, max_new_tokens=5), 422, EVENT, "`min_new_tokens` must"),
    ("best-of-3", params(best_of=3, do_sample=True), 422, EVENT, "`best_of` must be > 0 and <= 2"),
    ("best-of-0", params(best_of=0, do_sample=True), 422, EVENT, "<= 2. Given: 0"),
    ("best-of-greedy", params(best_of=2), 422, EVENT, "you must use sampling when `best_of`"),
    (
        "best-of-seed",
        params(best_of=2, do_sample=True, seed=3),
        422,
        EVENT,
        "`seed` must not be set when `best_of` > 1",
    ),
]
# What the stream says instead, where TGI checks streaming rules first.
STREAM_MESSAGE = {
    "best-of-3": "`best_of` != 1 is not supported when streaming tokens",
    "best-of-0": "`best_of` != 1 is not supported when streaming tokens",
    "best-of-greedy": "`best_of` != 1 is not supported when streaming tokens",
    "best-of-seed": "`best_of` != 1 is not supported when streaming tokens",
}


def _post_kwargs(body) -> dict:
    if isinstance(body, bytes):
        return {"content": body, "headers": {"content-type": "application/json"}}
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


def _events(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


async def _check_bad_request(client, case) -> None:
    name, body, status, stream_kind, message = case
    response = await client.post("/generate", **_post_kwargs(body))
    assert response.status_code == status, (name, response.text)
    error = response.json()
    assert error["error_type"] == "validation", name
    assert message in error["error"], (name, error)
    if stream_kind == EVENT:
        assert error["error"].startswith("Input validation error: "), name
    stream = await client.post("/generate_stream", **_post_kwargs(body))
    if stream_kind == HTTP:
        assert (stream.status_code, stream.json()) == (status, error), name
        return
    assert stream.status_code == 200, name
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = _events(stream.text)
    assert len(events) == 1, (name, events)
    assert set(events[0]) == {"error", "error_type"}
    assert events[0]["error_type"] == "validation"
    assert STREAM_MESSAGE.get(name, message) in events[0]["error"], (name, events)


async def test_more_than_thirty_bad_requests_are_counted():
    assert len(BAD_REQUESTS) >= 30
    assert len({case[0] for case in BAD_REQUESTS}) == len(BAD_REQUESTS)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
async def test_bad_request_gets_tgis_status_and_error(case):
    async with router() as (client, _, _):
        await _check_bad_request(client, case)


async def test_after_every_bad_request_the_server_still_serves():
    async with router() as (client, _, allocator):
        for case in BAD_REQUESTS:
            await _check_bad_request(client, case)
        response = await client.post("/generate", json=params(max_new_tokens=5))
        assert response.json() == {"generated_text": "Hello"}
        assert allocator.num_used_blocks == 0


async def test_decoder_input_details_is_refused_on_streams_only():
    body = params(max_new_tokens=2, decoder_input_details=True)
    async with router() as (client, _, _):
        generated = await client.post("/generate", json=body)
        streamed = await client.post("/generate_stream", json=body)
    assert generated.status_code == 200
    assert "details" in generated.json()  # as TGI: decoder_input_details implies details
    assert _events(streamed.text) == [
        {
            "error": "Input validation error: `decoder_input_details` == true is not "
            "supported when streaming tokens",
            "error_type": "validation",
        }
    ]


async def test_best_of_disabled_by_max_best_of_1():
    async with router(max_best_of=1) as (client, _, _):
        response = await client.post("/generate", json=params(best_of=2, do_sample=True))
    assert response.status_code == 422
    assert "`best_of` != 1 is not allowed for this endpoint" in response.json()["error"]


async def test_payload_limit_applies_to_every_route():
    async with router(payload_limit=100) as (client, _, _):
        for route in ("/generate", "/generate_stream", "/", "/tokenize"):
            response = await client.post(route, json={"inputs": "x" * 200})
            assert response.status_code == 413, route
            assert response.json()["error_type"] == "payload_too_large"


# -- effects the router owns -------------------------------------------------


async def test_return_full_text_prepends_the_inputs():
    async with router() as (client, _, _):
        full = await client.post("/generate", json=params(max_new_tokens=5, return_full_text=True))
        plain = await client.post("/generate", json=params(max_new_tokens=5))
        compat = await client.post("/", json=params(max_new_tokens=5, return_full_text=False))
        stream = await client.post(
            "/generate_stream", json=params(max_new_tokens=5, return_full_text=True)
        )
    assert full.json()["generated_text"] == "HiHello"
    assert plain.json()["generated_text"] == "Hello"
    assert compat.json() == [{"generated_text": "Hello"}]
    assert _events(stream.text)[-1]["generated_text"] == "HiHello"


async def test_truncate_keeps_the_last_tokens():
    # The fake shard replies by the first prompt token: after truncation that is "H".
    body = {"inputs": "QQQHi", P: {"truncate": 2, "max_new_tokens": 5, "details": True}}
    async with router() as (client, _, _):
        stream = await client.post("/generate_stream", json=body)
    last = _events(stream.text)[-1]
    assert last["generated_text"] == "Hello"
    assert last["details"]["input_length"] == 2


async def test_stop_is_not_matched_before_min_new_tokens():
    body = {"inputs": "S", P: {"stop": ["o"], "min_new_tokens": 3, "details": True}}
    async with router() as (client, _, _):
        response = await client.post("/generate", json=body)
    # "one two ...": the "o" at token 1 is too early; the next "o" ends the text.
    assert response.json()["generated_text"] == "one two"
    assert response.json()["details"]["finish_reason"] == "stop_sequence"


async def test_ignore_eos_token_generates_max_new_tokens():
    body = params(max_new_tokens=15, ignore_eos_token=True, details=True)
    async with router() as (client, _, _):
        details = (await client.post("/generate", json=body)).json()["details"]
    assert details["generated_tokens"] == 15
    assert details["finish_reason"] == "length"
    assert details["tokens"][11]["id"] == EOS and details["tokens"][11]["special"]


async def test_best_of_returns_one_sequence_and_the_others_in_details():
    body = params(best_of=2, do_sample=True, max_new_tokens=3, details=True)
    async with router() as (client, state, _):
        response = await client.post("/generate", json=body)
        assert state.infer.num_in_flight == 0
    details = response.json()["details"]
    assert response.json()["generated_text"] == "Hel"
    [other] = details["best_of_sequences"]
    assert set(other) == {
        "generated_text", "finish_reason", "generated_tokens", "seed", "prefill", "tokens",
    }  # fmt: skip
    assert other["seed"] is not None and other["seed"] != details["seed"]


async def test_best_of_takes_one_admission_slot_per_sequence():
    async with router(max_concurrent_requests=1) as (client, _, _):
        response = await client.post("/generate", json=params(best_of=2, do_sample=True))
    assert response.status_code == 429


async def test_watermark_and_adapter_id_are_accepted():
    body = params(max_new_tokens=5, watermark=True, adapter_id="some/unknown-adapter")
    async with router() as (client, _, _):
        response = await client.post("/generate", json=body)
    assert response.json() == {"generated_text": "Hello"}


async def test_null_parameters_mean_defaults_as_in_serde():
    body = {"inputs": "Hi", P: {"temperature": None, "stop": None, "max_new_tokens": 5}}
    async with router() as (client, _, _):
        response = await client.post("/generate", json=body)
    assert response.json() == {"generated_text": "Hello"}


async def test_tokenize_lists_tokens_in_tgis_shape():
    async with router() as (client, _, _):
        response = await client.post("/tokenize", json={"inputs": "Hi!"})
    assert response.json() == [
        {"id": ord(c), "text": c, "start": 0, "stop": 0} for c in "Hi!"
    ]  # a tokenizer without offsets gets (0, 0) spans, as in TGI


# -- units -------------------------------------------------------------------


def _events_with(logprobs: list[float]) -> list[StreamEvent]:
    return [StreamEvent(Token(1, "a", lp, False), ()) for lp in logprobs]


def test_best_of_picks_the_highest_mean_logprob_as_tgi():
    low, high = _events_with([-1.0, -1.0]), _events_with([-0.2, -0.4])
    assert pick_best([low, high]) == 1
    assert pick_best([high, low]) == 0
    # Per token, not summed: a short sequence is not favoured by its length alone.
    assert pick_best([_events_with([-0.5]), _events_with([-0.3, -0.3, -0.3])]) == 1


def test_stop_match_reports_what_lies_past_the_stop():
    matcher = StopSequenceMatcher(("Par",))
    assert matcher.match("The capital is Pa") is None
    assert matcher.match("ris.") == ("Par", 3)


class _WordTokenizer:
    """Token i is WORDS[i]; decoding concatenates."""

    WORDS = ["<eos>", " The", " capital", " is", " Paris", "."]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.WORDS[i] for i in ids if i or not skip_special_tokens)


def test_text_ends_with_the_stop_when_it_ends_inside_a_token():
    info = tokenizer_info()
    info.tokenizer = _WordTokenizer()
    request = ValidRequest("x", (1,), SamplingParams(), StoppingParams(10, stop_sequences=("Par",)))
    entry = Entry(0, request, info)
    for token_id in (2, 3, 4):
        event = entry.add_token(token_id, -0.1, ())
    assert event.ending is not None
    assert event.ending.generated_text == " capital is Par"
    assert event.ending.stop_sequence == "Par"
    assert event.token.text == " Paris"  # the token itself is reported as generated


def test_min_new_tokens_and_watermark_reach_the_shard():
    request = ValidRequest(
        "x", (1,), SamplingParams(), StoppingParams(10, min_new_tokens=4), watermark=True
    )
    proto = request.sampling_proto(frozenset({2, 0}))
    assert (proto.min_new_tokens, list(proto.eos_token_ids)) == (4, [0, 2])
    plain = ValidRequest("x", (1,), SamplingParams(), StoppingParams(10))
    assert list(plain.sampling_proto(frozenset({0})).eos_token_ids) == []
    keyed = pb.WatermarkParameters(key=7, gamma=0.5, delta=2.0)
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    marked, unmarked = Entry(1, request, tokenizer_info()), Entry(2, plain, tokenizer_info())
    for entry in (marked, unmarked):
        entry.allocation = allocator.allocate(entry.request.max_total_tokens)
    assert _to_proto(PrefillChunk(marked, 0, 1), keyed).watermark == keyed
    assert not _to_proto(PrefillChunk(unmarked, 0, 1), keyed).HasField("watermark")

"""Every TGI generate parameter against the real server and the real model, each test
asserting the parameter's effect (against transformers in float32 where a number is
involved), plus TGI's own clients: `text-generation` (in its own venv) and
`huggingface_hub.InferenceClient`."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from launcher_process import Launcher

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
CHAT = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
REPEATING = "one two three one two three one two three one two"
TOL = 1e-3


@pytest.fixture(scope="module")
def hf(model_dir):
    """transformers' float32 model and tokenizer: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), tokenizer


def log_softmax(hf, ids: list[int]):
    """Next-token log-probabilities at every position of `ids`. [L, V]"""
    import torch

    model, _ = hf
    with torch.no_grad():
        logits = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def generate(url: str, inputs: str, route: str = "/generate", **parameters) -> dict:
    response = httpx.post(
        url + route, json={"inputs": inputs, "parameters": parameters}, timeout=300
    )
    assert response.status_code == 200, response.text
    return response.json()


def token_ids(body: dict) -> list[int]:
    return [t["id"] for t in body["details"]["tokens"]]


def sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]


# -- logprobs against transformers ------------------------------------------


def test_top_n_tokens_are_sorted_and_match_transformers(launcher: Launcher, hf):
    body = generate(launcher.url, PROMPT, max_new_tokens=6, details=True, top_n_tokens=3)
    prompt_ids = hf[1](PROMPT)["input_ids"]
    generated = token_ids(body)
    reference = log_softmax(hf, prompt_ids + generated[:-1])[len(prompt_ids) - 1 :]
    top_tokens = body["details"]["top_tokens"]
    assert len(top_tokens) == len(generated) == 6
    for step, (alternatives, token) in enumerate(
        zip(top_tokens, body["details"]["tokens"], strict=True)
    ):
        logprobs = [t["logprob"] for t in alternatives]
        assert len(alternatives) == 3 and logprobs == sorted(logprobs, reverse=True)
        values, ids = reference[step].topk(3)
        assert [t["id"] for t in alternatives] == ids.tolist()
        assert logprobs == pytest.approx(values.tolist(), abs=TOL)
        assert token["logprob"] == pytest.approx(reference[step, token["id"]].item(), abs=TOL)


def test_decoder_input_details_prefill_matches_transformers(launcher: Launcher, hf):
    body = generate(launcher.url, PROMPT, max_new_tokens=1, decoder_input_details=True)
    prefill = body["details"]["prefill"]  # details come with decoder_input_details, as TGI
    prompt_ids = hf[1](PROMPT)["input_ids"]
    assert [t["id"] for t in prefill] == prompt_ids
    assert prefill[0]["logprob"] is None
    reference = log_softmax(hf, prompt_ids)
    expected = [reference[i - 1, prompt_ids[i]].item() for i in range(1, len(prompt_ids))]
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(expected, abs=TOL)


# -- penalties, warpers, seeds ------------------------------------------------


def repeats(ids: list[int], prompt_ids: list[int]) -> int:
    """Generated tokens that already occurred in the prompt or earlier output."""
    seen, count = set(prompt_ids), 0
    for i in ids:
        count += i in seen
        seen.add(i)
    return count


@pytest.mark.parametrize(
    "penalty", [{"repetition_penalty": 1.8}, {"frequency_penalty": 1.5}, {"presence_penalty": 1.5}]
)
def test_penalties_reduce_repetition_of_greedy_output(launcher: Launcher, hf, penalty):
    prompt_ids = hf[1](REPEATING)["input_ids"]
    plain = token_ids(generate(launcher.url, REPEATING, max_new_tokens=12, details=True))
    penalised = token_ids(
        generate(launcher.url, REPEATING, max_new_tokens=12, details=True, **penalty)
    )
    # repetition_penalty counts the prompt; frequency/presence only generated tokens.
    context = prompt_ids if "repetition_penalty" in penalty else []
    assert repeats(penalised, context) < repeats(plain, context)


@pytest.mark.parametrize("warper", [{"top_k": 1}, {"top_p": 0.001}, {"typical_p": 0.001}])
def test_narrow_warpers_make_sampling_independent_of_the_seed(launcher: Launcher, warper):
    runs = [
        generate(launcher.url, PROMPT, max_new_tokens=8, details=True, seed=seed, **warper)
        for seed in (1, 2)
    ]
    assert runs[0]["details"]["seed"] == 1  # a warper turns sampling on, as TGI
    assert token_ids(runs[0]) == token_ids(runs[1])
    if "typical_p" not in warper:  # top-k 1 and a tiny top-p keep only the argmax
        greedy = generate(launcher.url, PROMPT, max_new_tokens=8, details=True)
        assert token_ids(runs[0]) == token_ids(greedy)


def test_min_p_keeps_only_tokens_near_the_top(launcher: Launcher):
    def worst_ratio(**parameters) -> float:
        body = generate(
            launcher.url, PROMPT, max_new_tokens=24, details=True, top_n_tokens=1,
            temperature=3.0, seed=5, **parameters,
        )  # fmt: skip
        details = body["details"]
        return min(
            t["logprob"] - top[0]["logprob"]
            for t, top in zip(details["tokens"], details["top_tokens"], strict=True)
        )

    assert worst_ratio() < math.log(0.3)  # hot sampling strays far from the top token
    assert worst_ratio(min_p=0.3) >= math.log(0.3) - TOL


def test_do_sample_with_different_seeds_differs_and_same_seed_repeats(launcher: Launcher):
    def run(seed: int) -> list[int]:
        body = generate(
            launcher.url, PROMPT, max_new_tokens=16, details=True, do_sample=True, seed=seed
        )
        return token_ids(body)

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_seeded_sampling_is_the_same_alone_and_batched(launcher: Launcher):
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 16, "temperature": 0.9, "seed": 42, "details": True},
    }
    alone = token_ids(generate(launcher.url, PROMPT, **body["parameters"]))

    async def batched() -> list[int]:
        async with httpx.AsyncClient(base_url=launcher.url, timeout=300) as client:
            others = [
                client.post(
                    "/generate",
                    json={"inputs": p, "parameters": {"max_new_tokens": 16, "do_sample": True}},
                )
                for p in ("Once upon a time", "def f(x):", "1, 2, 3,")
            ]
            responses = await asyncio.gather(client.post("/generate", json=body), *others)
        return token_ids(responses[0].json())

    assert asyncio.run(batched()) == alone


def test_best_of_returns_the_sequence_with_the_highest_mean_logprob(launcher: Launcher):
    body = generate(launcher.url, PROMPT, max_new_tokens=8, best_of=2, do_sample=True, details=True)
    details = body["details"]
    [other] = details["best_of_sequences"]

    def mean(tokens: list[dict]) -> float:
        return sum(t["logprob"] for t in tokens) / len(tokens)

    assert mean(details["tokens"]) >= mean(other["tokens"])
    assert details["seed"] != other["seed"]
    assert body["generated_text"] != other["generated_text"] or details["tokens"] == other["tokens"]


# -- lengths and stopping -----------------------------------------------------


def test_truncate_keeps_the_last_tokens(launcher: Launcher, hf):
    long_prompt = "In a hole in the ground there lived a hobbit. " * 4
    prompt_ids = hf[1](long_prompt)["input_ids"]
    body = generate(
        launcher.url, long_prompt, max_new_tokens=4, truncate=7, decoder_input_details=True
    )
    assert [t["id"] for t in body["details"]["prefill"]] == prompt_ids[-7:]
    tail_text = hf[1].decode(prompt_ids[-7:])
    assert token_ids(body) == token_ids(
        generate(launcher.url, tail_text, max_new_tokens=4, details=True)
    )


def test_stop_ends_the_text_at_the_stop_string(launcher: Launcher):
    free = generate(launcher.url, PROMPT, max_new_tokens=20)["generated_text"]
    stop = free[len(free) // 2 : len(free) // 2 + 4]  # likely straddles a token boundary
    body = generate(launcher.url, PROMPT, max_new_tokens=20, stop=[stop], details=True)
    assert body["generated_text"] == free[: free.index(stop) + len(stop)]
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_min_new_tokens_masks_eos_as_transformers_does(launcher: Launcher, hf):
    import torch

    free = generate(launcher.url, CHAT, max_new_tokens=64, details=True)["details"]
    assert free["finish_reason"] == "eos_token"
    min_new = free["generated_tokens"] + 4
    body = generate(
        launcher.url, CHAT, max_new_tokens=min_new + 4, min_new_tokens=min_new, details=True
    )
    assert body["details"]["generated_tokens"] >= min_new
    model, tokenizer = hf
    input_ids = tokenizer(CHAT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
            min_new_tokens=min_new, max_new_tokens=min_new + 4,
        )[0, input_ids.shape[1] :].tolist()  # fmt: skip
    assert token_ids(body) == expected


def test_ignore_eos_token_generates_exactly_max_new_tokens(launcher: Launcher):
    body = generate(launcher.url, CHAT, max_new_tokens=40, ignore_eos_token=True, details=True)
    assert body["details"]["generated_tokens"] == 40
    assert body["details"]["finish_reason"] == "length"


def test_return_full_text_and_the_compat_default(launcher: Launcher):
    plain = generate(launcher.url, PROMPT, max_new_tokens=4)["generated_text"]
    full = generate(launcher.url, PROMPT, max_new_tokens=4, return_full_text=True)
    compat = httpx.post(
        launcher.url + "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    ).json()
    assert full["generated_text"] == PROMPT + plain
    assert compat == [{"generated_text": PROMPT + plain}]


def test_unknown_adapter_id_falls_back_to_the_base_model(launcher: Launcher):
    plain = generate(launcher.url, PROMPT, max_new_tokens=4)
    assert generate(launcher.url, PROMPT, max_new_tokens=4, adapter_id="x/y") == plain
    # (`watermark` biases the output: integration-tests/test_watermark.py.)


# -- routes -------------------------------------------------------------------


def test_tokenize_gives_ids_and_character_spans(launcher: Launcher, hf):
    text = "Héllo wörld, 1+1=2"
    tokens = httpx.post(launcher.url + "/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in tokens] == hf[1](text)["input_ids"]
    assert "".join(t["text"] for t in tokens) == text
    assert all(text[t["start"] : t["stop"]] == t["text"] for t in tokens)


def test_info_has_tgis_fields(launcher: Launcher):
    info = httpx.get(launcher.url + "/info").json()
    assert {
        "model_id", "model_sha", "model_pipeline_tag", "max_concurrent_requests", "max_best_of",
        "max_stop_sequences", "max_input_tokens", "max_total_tokens", "validation_workers",
        "max_client_batch_size", "router", "version", "sha", "docker_label",
    } <= set(info)  # fmt: skip
    assert (info["max_best_of"], info["max_stop_sequences"]) == (2, 4)


BAD = [
    ({"inputs": "hi", "parameters": {"max_new_tokens": 5000}}, 422, "must be <= 1536"),
    ({"inputs": "hi", "parameters": {"temperature": -1}}, 422, "`temperature` must be strictly"),
    ({"inputs": "hi", "parameters": {"top_n_tokens": 9}}, 422, "<= 5. Given: 9"),
    ({"inputs": "hi", "parameters": {"best_of": 2}}, 422, "you must use sampling"),
    ({"inputs": "hi", "parameters": {"seed": -4}}, 422, "expected u64"),
    ({"inputs": ["hi"]}, 422, "expected a string"),
]


def test_bad_requests_on_the_real_server_then_it_still_serves(launcher: Launcher):
    for body, status, message in BAD:
        response = httpx.post(launcher.url + "/generate", json=body)
        assert response.status_code == status, body
        assert response.json()["error_type"] == "validation" and message in response.json()["error"]
    raw = httpx.post(
        launcher.url + "/generate",
        content=b'{"inputs": "hi", "parameters": {"top_p": NaN}}',
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400 and raw.json()["error_type"] == "validation"
    stream = httpx.post(
        launcher.url + "/generate_stream", json={"inputs": "hi", "parameters": {"top_k": 0}}
    )
    assert stream.status_code == 200
    assert sse(stream) == [
        {
            "error": "Input validation error: `top_k` must be strictly positive",
            "error_type": "validation",
        }
    ]
    assert generate(launcher.url, PROMPT, max_new_tokens=2)["generated_text"]


# -- TGI's clients ------------------------------------------------------------


def test_huggingface_hub_inference_client(launcher: Launcher):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError

    client = InferenceClient(base_url=launcher.url)
    output = client.text_generation(
        PROMPT, max_new_tokens=6, details=True, decoder_input_details=True, top_n_tokens=2,
        return_full_text=False,
    )  # fmt: skip
    assert output.details.finish_reason == "length" and output.details.generated_tokens == 6
    assert len(output.details.prefill) > 1 and len(output.details.top_tokens[0]) == 2
    events = list(
        client.text_generation(
            PROMPT, max_new_tokens=6, details=True, stream=True, return_full_text=False
        )
    )
    assert "".join(e.token.text for e in events) == output.generated_text
    assert events[-1].generated_text == output.generated_text
    assert events[-1].details.generated_tokens == 6
    with pytest.raises(ValidationError, match="`top_k` must be strictly positive"):
        list(client.text_generation(PROMPT, top_k=0, stream=True))
    with pytest.raises(ValidationError):
        client.text_generation(PROMPT, max_new_tokens=5000)


TEXT_GENERATION_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from text_generation import Client
    from text_generation.errors import ValidationError

    client = Client(sys.argv[1], timeout=300)
    out = {}
    response = client.generate(
        sys.argv[2], max_new_tokens=6, decoder_input_details=True, top_n_tokens=2
    )
    out["text"] = response.generated_text
    out["finish_reason"] = response.details.finish_reason.value
    out["tokens"] = [t.id for t in response.details.tokens]
    out["prefill"] = len(response.details.prefill)
    out["top_tokens"] = [len(t) for t in response.details.top_tokens]
    best = client.generate(sys.argv[2], max_new_tokens=4, best_of=2, do_sample=True)
    out["best_of_sequences"] = len(best.details.best_of_sequences)
    events = list(client.generate_stream(sys.argv[2], max_new_tokens=6))
    out["stream_text"] = "".join(e.token.text for e in events)
    out["stream_final"] = events[-1].generated_text
    errors = []
    try:
        client.generate(sys.argv[2], max_new_tokens=5000)
    except ValidationError as error:
        errors.append(str(error))
    try:
        list(client.generate_stream(sys.argv[2], max_new_tokens=4, top_n_tokens=99))
    except ValidationError as error:
        errors.append(str(error))
    out["errors"] = errors
    print(json.dumps(out))
    """
)


def text_generation_python() -> Path:
    """A venv with the real `text-generation` client (it pins an old huggingface_hub)."""
    cache = Path(os.environ.get("TEXTGEN_CACHE", Path.home() / ".cache" / "textgen"))
    venv = cache / "test-venvs" / "text-generation"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import text_generation"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "text-generation"], check=True
        )
    return python


def test_text_generation_client(launcher: Launcher, hf):
    python = text_generation_python()
    result = subprocess.run(
        [str(python), "-c", TEXT_GENERATION_SCRIPT, launcher.url, PROMPT],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    greedy = generate(launcher.url, PROMPT, max_new_tokens=6, details=True)
    assert out["text"] == greedy["generated_text"] and out["tokens"] == token_ids(greedy)
    assert out["finish_reason"] == "length"
    assert out["prefill"] == len(hf[1](PROMPT)["input_ids"])
    assert out["top_tokens"] == [2] * 6
    assert out["best_of_sequences"] == 1
    assert out["stream_text"] == out["stream_final"] == greedy["generated_text"]
    assert len(out["errors"]) == 2
    assert "must be <= 1536" in out["errors"][0]
    assert "`top_n_tokens` must be >= 0 and <= 5. Given: 99" in out["errors"][1]

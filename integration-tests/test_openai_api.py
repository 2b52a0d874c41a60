"""The OpenAI API end to end: the real `openai` SDK and huggingface_hub against the real server."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
from launcher_process import Launcher, start_launcher, stop_launcher

pytestmark = pytest.mark.integration

NEW_TOKENS = 32
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Name three colors."}]},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def text_messages(chat: list[dict]) -> list[dict]:
    """Content-part lists as the plain strings transformers' template expects."""
    return [
        {**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
        for m in chat
    ]


def chat_ids(tokenizer, chat: list[dict]) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        text_messages(chat), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer) -> list[list[int]]:
    """transformers' greedy continuation of every chat, in float32, ending at EOS if any."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    for chat in CHATS:
        input_ids = torch.tensor([chat_ids(tokenizer, chat)])
        with torch.no_grad():
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        outputs.append(generated[0, input_ids.shape[1] :].tolist())
    return outputs


@pytest.fixture(scope="module")
def client(launcher: Launcher) -> openai.OpenAI:
    return openai.OpenAI(base_url=launcher.url + "/v1", api_key="-", max_retries=0)


@pytest.fixture()
def async_client(launcher: Launcher) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=launcher.url + "/v1", api_key="-", max_retries=0)


def test_greedy_chat_matches_transformers_token_for_token(client, tokenizer, reference):
    for chat, expected in zip(CHATS, reference, strict=True):
        response = client.chat.completions.create(
            model="anything", messages=chat, temperature=0, max_tokens=NEW_TOKENS, logprobs=True
        )
        choice = response.choices[0]
        ends_with_eos = expected[-1] == tokenizer.eos_token_id
        assert choice.finish_reason == ("stop" if ends_with_eos else "length")
        assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
        assert response.usage.completion_tokens == len(expected)
        assert response.usage.prompt_tokens == len(chat_ids(tokenizer, chat))
        tokens = [item.token for item in choice.logprobs.content]
        assert tokens == [tokenizer.decode([t]) for t in expected if t != tokenizer.eos_token_id]


def test_async_stream_adds_up_to_the_non_streamed_answer(client, async_client, tokenizer):
    chat = CHATS[0]
    whole = client.chat.completions.create(
        model="m", messages=chat, temperature=0, max_tokens=NEW_TOKENS
    )

    async def stream() -> list:
        chunks = await async_client.chat.completions.create(
            model="m",
            messages=chat,
            temperature=0,
            max_tokens=NEW_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [chunk async for chunk in chunks]

    chunks = asyncio.run(stream())
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completions_match_generate_and_count_prompt_tokens(launcher, client, tokenizer):
    generated = httpx.post(
        launcher.url + "/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}},
        timeout=120,
    ).json()["generated_text"]
    response = client.completions.create(model="m", prompt=PROMPT, temperature=0, max_tokens=12)
    assert response.choices[0].text == generated
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert response.usage.completion_tokens == 12


def test_async_completions_stream_with_echo(async_client):
    async def stream() -> str:
        chunks = await async_client.completions.create(
            model="m", prompt=PROMPT, temperature=0, max_tokens=6, stream=True, echo=True
        )
        return "".join([chunk.choices[0].text async for chunk in chunks])

    text = asyncio.run(stream())
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


def test_completion_logprobs_with_echo_cover_the_prompt(client, tokenizer):
    response = client.completions.create(
        model="m", prompt=PROMPT, temperature=0, max_tokens=4, logprobs=2, echo=True
    )
    logprobs = response.choices[0].logprobs
    num_prompt = len(tokenizer(PROMPT).input_ids)
    assert len(logprobs.tokens) == num_prompt + 4
    assert logprobs.token_logprobs[0] is None
    assert all(lp < 0 for lp in logprobs.token_logprobs[1:])
    assert all(len(top) == 2 for top in logprobs.top_logprobs[num_prompt:])


def test_top_logprobs_rank_the_greedy_choice_first(client):
    response = client.chat.completions.create(
        model="m", messages=CHATS[0], temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    for item in response.choices[0].logprobs.content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob


def test_n_choices_and_seed_reproducibility(client):
    def sample(seed: int):
        return client.chat.completions.create(
            model="m",
            messages=CHATS[2],
            n=2,
            seed=seed,
            temperature=1.0,
            max_tokens=16,
            extra_body={"ignore_eos": True},
        )

    first, again, other = sample(7), sample(7), sample(8)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts[0] != texts[1]
    assert texts == [c.message.content for c in again.choices]
    assert texts != [c.message.content for c in other.choices]
    assert first.usage.completion_tokens == 2 * 16
    greedy = client.chat.completions.create(
        model="m", messages=CHATS[2], n=2, temperature=0, max_tokens=8
    )
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_logit_bias_steers_the_greedy_choice(client, tokenizer, reference):
    def first_token(logit_bias: dict[str, float]) -> str:
        response = client.chat.completions.create(
            model="m",
            messages=CHATS[0],
            temperature=0,
            max_tokens=1,
            logprobs=True,
            logit_bias=logit_bias,
        )
        return response.choices[0].logprobs.content[0].token

    greedy = reference[0][0]
    assert first_token({}) == tokenizer.decode([greedy])
    assert first_token({str(greedy): -100}) != tokenizer.decode([greedy])
    target = tokenizer.encode(" banana")[0]
    assert first_token({str(target): 100}) == tokenizer.decode([target])


def test_stop_and_max_tokens(client, tokenizer, reference):
    full = tokenizer.decode(reference[0], skip_special_tokens=True)
    stop = full.split()[2]  # a word in the middle of the greedy answer
    response = client.chat.completions.create(
        model="m", messages=CHATS[0], temperature=0, max_tokens=NEW_TOKENS, stop=[stop]
    )
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == full[: full.index(stop)]
    short = client.chat.completions.create(
        model="m", messages=CHATS[0], temperature=0, max_tokens=3
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3


def test_errors_map_to_the_sdk_exceptions(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=CHATS[0], temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        client.chat.completions.create(model="m", messages=CHATS[0], max_tokens=5000)
    assert "`max_tokens`" in too_long.value.message
    with pytest.raises(openai.UnprocessableEntityError, match="invalid regex"):
        client.chat.completions.create(
            model="m", messages=CHATS[0], response_format={"type": "regex", "value": "(a"}
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt=[1, 2, 3])


def test_models_lists_the_served_model(launcher, client):
    served = httpx.get(launcher.url + "/info").json()["model_id"]
    assert [model.id for model in client.models.list()] == [served]


def test_chat_tokenize_returns_the_templated_prompt(launcher, tokenizer):
    response = httpx.post(launcher.url + "/chat_tokenize", json={"messages": CHATS[0]})
    body = response.json()
    assert body["templated_text"] == tokenizer.apply_chat_template(
        CHATS[0], add_generation_prompt=True, tokenize=False
    )
    assert [t["id"] for t in body["tokenize_response"]] == chat_ids(tokenizer, CHATS[0])
    first = body["tokenize_response"][0]
    assert body["templated_text"][first["start"] : first["stop"]] == first["text"]


def test_huggingface_hub_chat_completion(launcher, client):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    hub = InferenceClient(base_url=launcher.url)
    answer = hub.chat_completion(CHATS[0], max_tokens=12, temperature=0)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in hub.chat_completion(CHATS[0], max_tokens=12, temperature=0, stream=True)
        if chunk.choices
    )
    sdk = client.chat.completions.create(model="m", messages=CHATS[0], temperature=0, max_tokens=12)
    assert answer.choices[0].message.content == streamed == sdk.choices[0].message.content
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    constrained = hub.chat_completion(
        CHATS[0],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert set(json.loads(constrained.choices[0].message.content)) == {"city"}
    with pytest.raises(HfHubHTTPError) as refused:
        hub.chat_completion(CHATS[0], response_format={"type": "regex", "value": "(a"})
    assert refused.value.response.status_code == 422
    assert "invalid regex" in refused.value.response.text


def test_overload_raises_rate_limit_error(tmp_path, model_dir):
    own = start_launcher(tmp_path, "--max-concurrent-requests", "1")
    try:
        sdk = openai.OpenAI(base_url=own.url + "/v1", api_key="-", max_retries=0)
        busy = threading.Event()

        def hold_the_only_slot() -> None:
            stream = sdk.completions.create(
                model="m",
                prompt=PROMPT,
                max_tokens=200,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for _ in stream:
                busy.set()

        holder = threading.Thread(target=hold_the_only_slot)
        holder.start()
        assert busy.wait(120)
        with pytest.raises(openai.RateLimitError) as limited:
            sdk.chat.completions.create(model="m", messages=CHATS[0], max_tokens=4)
        assert limited.value.response.headers["retry-after"] == "1"
        holder.join(300)
    finally:
        stop_launcher(own)

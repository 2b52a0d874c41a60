"""Watermarking end to end: the real model marks, the router's endpoint and the CLI detect.

The session launcher runs with the default watermark key, gamma 0.5, delta 2.0
and z threshold 4.0. Every generation is sent at once so that they share
batches, watermarked and plain side by side.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from launcher_process import Launcher

pytestmark = pytest.mark.integration

NEW_TOKENS = 200
THRESHOLD = 4.0
# Texts below this z are "not detected" in the false-positive counts.
FALSE_POSITIVE_Z = 2.0
# Of the 40 unmarked texts (20 generated, 20 human), this many may reach
# FALSE_POSITIVE_Z (one-sided P(z >= 2) = 2.3%, about 1 expected). Measured: 2,
# a plain generation at z = 2.79 and a human paragraph at z = 2.03 (README); one
# more is allowed, as kernel changes can move the sampled plain texts.
MAX_FALSE_POSITIVES = 3
# Every third word replaced breaks about half the (previous, token) pairs: the
# median z over the 20 marked texts stays above this (measured about 3, README).
MEDIAN_Z_EDITED = 2.5
HUMAN_TEXTS = (Path(__file__).parent / "data" / "human_paragraphs.txt").read_text()
HUMAN_PARAGRAPHS = HUMAN_TEXTS.strip().split("\n\n")
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold.",
    "Describe your ideal weekend in the mountains.",
    "What are the main causes of the French Revolution?",
    "Give some advice to someone starting their first job.",
    "Tell me about the life cycle of a butterfly.",
    "Why do people enjoy listening to sad music?",
    "Write a letter to a friend you have not seen in ten years.",
    "How does a bill become a law?",
    "Describe a busy market in a city you love.",
    "What should I consider when adopting a dog?",
    "Explain the rules of football to a child.",
    "Write a product review of a pair of hiking boots.",
    "What is the difference between weather and climate?",
    "Tell a story about a robot learning to paint.",
    "How can a small town attract more visitors?",
    "Describe the taste of a perfect cup of coffee.",
    "What are the benefits of learning a second language?",
    "Write a diary entry of a sailor crossing the Atlantic in 1850.",
    "Explain why the sky is blue.",
]
# Multinomial sampling at temperature 1, as in the paper. (Lower temperature or
# top-p leave less entropy for the mark: at 0.9 / 0.95 the lowest z was 4.3.)
SAMPLING = {"do_sample": True}
JSON_HEADERS = {"content-type": "application/json"}
REPLACEMENTS = ["apple", "quickly", "green", "river", "seven", "often", "paper", "loud"]


def chat(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


async def generate(client: httpx.AsyncClient, prompt: str, seed: int, watermark: bool) -> str:
    parameters = {
        **SAMPLING,
        "seed": seed,
        "max_new_tokens": NEW_TOKENS,
        "ignore_eos_token": True,
        "watermark": watermark,
    }
    body = {"inputs": chat(prompt), "parameters": parameters}
    response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


@pytest.fixture(scope="module")
def generations(launcher: Launcher) -> dict[bool, list[str]]:
    """20 watermarked and 20 plain generations of the same prompts and seeds, all at once."""

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=launcher.url, timeout=600) as client:
            jobs = [
                generate(client, prompt, seed, watermark)
                for watermark in (True, False)
                for seed, prompt in enumerate(PROMPTS)
            ]
            return await asyncio.gather(*jobs)

    texts = asyncio.run(run())
    return {True: texts[: len(PROMPTS)], False: texts[len(PROMPTS) :]}


def detect(launcher: Launcher, body: dict) -> httpx.Response:
    return httpx.post(launcher.url + "/watermark/detect", json=body, timeout=60)


def z_scores(launcher: Launcher, texts: list[str]) -> list[float]:
    results = []
    for text in texts:
        response = detect(launcher, {"text": text})
        assert response.status_code == 200, response.text
        results.append(response.json()["z_score"])
    return results


def test_watermarked_generations_are_all_detected(launcher: Launcher, generations):
    assert generations[True] != generations[False]  # the mark changed the sampled text
    results = [detect(launcher, {"text": text}).json() for text in generations[True]]
    scores = [r["z_score"] for r in results]
    print(f"watermarked z: {sorted(round(z, 2) for z in scores)}")
    assert all(r["watermarked"] for r in results), scores
    assert all(r["num_tokens_scored"] >= 100 for r in results)
    assert all(r["p_value"] < 1e-4 for r in results)


def test_plain_generations_and_human_text_are_not_detected(launcher: Launcher, generations):
    plain = z_scores(launcher, generations[False])
    human = z_scores(launcher, HUMAN_PARAGRAPHS)
    assert len(human) == 20
    print(f"plain z: max {max(plain):.2f}; human z: max {max(human):.2f}")
    assert max(plain + human) < THRESHOLD
    false_positives = [z for z in plain + human if z >= FALSE_POSITIVE_Z]
    print(f"{len(false_positives)} of 40 unmarked texts at z >= 2: {false_positives}")
    assert len(false_positives) <= MAX_FALSE_POSITIVES


def replace_every_third_word(text: str) -> str:
    words = text.split(" ")
    for i in range(2, len(words), 3):
        words[i] = REPLACEMENTS[i % len(REPLACEMENTS)]
    return " ".join(words)


def test_the_mark_survives_every_third_word_replaced(launcher: Launcher, generations):
    edited = [replace_every_third_word(text) for text in generations[True]]
    assert edited != generations[True]
    scores = z_scores(launcher, edited)
    median = statistics.median(scores)
    print(f"every third word replaced, z: {sorted(round(z, 2) for z in scores)}")
    assert median > MEDIAN_Z_EDITED


def run_cli(model_dir: Path, path: Path, *flags: str) -> dict:
    script = Path(sys.executable).parent / "textgen-watermark"
    command = [str(script), "detect", str(path), "--model-dir", str(model_dir), *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_cli_detects_with_the_key_and_not_with_another(
    launcher: Launcher, generations, model_dir: Path, tmp_path: Path
):
    path = tmp_path / "marked.txt"
    path.write_text(generations[True][0])
    served = detect(launcher, {"text": generations[True][0]}).json()
    assert served["watermarked"]
    assert run_cli(model_dir, path) == served  # the same tokenizer, key and gamma
    assert not run_cli(model_dir, path, "--watermark-key", "not-the-servers-key")["watermarked"]


def test_another_key_detects_none_of_the_marked_texts(generations, model_dir: Path):
    from transformers import AutoTokenizer

    from textgen.router.watermark import WatermarkConfig
    from textgen.router.watermark import detect as detect_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    other = WatermarkConfig(key="not-the-servers-key")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in generations[True]]
    scores = [detect_ids(token_ids, other).z_score for token_ids in ids]
    print(f"marked texts under another key, z: {sorted(round(z, 2) for z in scores)}")
    assert max(scores) < FALSE_POSITIVE_Z + 1


def test_greedy_and_streamed_generations_carry_the_mark(launcher: Launcher):
    body = {"inputs": chat(PROMPTS[0]), "parameters": {"max_new_tokens": 60, "seed": 3}}
    with httpx.Client(base_url=launcher.url, timeout=120) as client:
        plain = client.post("/generate", json=body).json()["generated_text"]
        body["parameters"]["watermark"] = True
        marked = client.post("/generate", json=body).json()["generated_text"]
        with client.stream("POST", "/generate_stream", json=body) as stream:
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line]
    assert marked != plain
    assert events[-1]["generated_text"] == marked  # streamed = non-streamed, greedy
    assert detect(launcher, {"text": marked}).json()["z_score"] > FALSE_POSITIVE_Z


def test_token_ids_score_the_same_as_their_text(launcher: Launcher, model_dir: Path):
    from transformers import AutoTokenizer

    text = HUMAN_PARAGRAPHS[0]
    ids = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
    assert detect(launcher, {"token_ids": ids}).json() == detect(launcher, {"text": text}).json()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),  # as every route: TGI's JSON syntax error
        (b"[1, 2]", 422),
        (b"{}", 422),
        (b'{"text": ""}', 422),
        (b'{"text": "x", "token_ids": [1, 2]}', 422),
        (b'{"token_ids": [1, 99999999]}', 422),
        (b'{"token_ids": [5]}', 422),
    ],
)
def test_detect_rejects_bad_bodies_with_tgi_errors(launcher: Launcher, body: bytes, status: int):
    response = httpx.post(
        launcher.url + "/watermark/detect", content=body, headers=JSON_HEADERS, timeout=60
    )
    assert response.status_code == status
    assert response.json()["error_type"] == "validation"
    assert response.json()["error"]


def test_watermark_must_be_a_boolean(launcher: Launcher):
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "watermark": "yes"}}
    response = httpx.post(launcher.url + "/generate", json=body, timeout=60)
    assert response.status_code == 422
    assert "watermark" in response.json()["error"]

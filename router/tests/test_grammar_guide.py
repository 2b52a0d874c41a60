"""Grammar guidance in the router: compile + cache + budget, 422s, and the per-step masks that
the scheduler sends, with the real engine over the fake shard's character vocabulary."""

from __future__ import annotations

import asyncio
import json

import pytest
from router_fakes import EOS, allowed_tokens, grammar_compiler, tokenizer_info
from test_http import router
from test_scheduler import Harness

from textgen.router.errors import ValidationError
from textgen.router.grammar import GrammarConfig, GrammarSpec, check_ref_cycles
from textgen.router.request import Entry, SamplingParams, StoppingParams, ValidRequest

OBJECT = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


async def constrained_entry(compiler, request_id: int, prompt: str, spec, max_new_tokens=32):
    request = ValidRequest(
        inputs=prompt,
        input_ids=tuple(ord(c) for c in prompt),
        sampling=SamplingParams(),
        stopping=StoppingParams(max_new_tokens=max_new_tokens),
        grammar=await compiler.compile(spec),
    )
    return Entry(request_id, request, tokenizer_info())


async def test_masks_force_a_regex_on_a_shard_scripted_otherwise():
    compiler = grammar_compiler()
    h = Harness({"a": "hello world"}, grammar=compiler)
    entry = await constrained_entry(compiler, 1, "a", GrammarSpec.regex("[0-9]{3}"))
    h.queue.append(entry)
    event = await h.final_event(entry)
    assert event.ending.generated_text == "000"  # the lowest allowed token, every step
    assert event.ending.finish_reason == "eos_token"
    first = h.shard.masks[0][1]
    assert allowed_tokens(first) == [ord(c) for c in "0123456789"]
    assert len(first) == 128 // 8  # one bit per token, whole int32 words
    h.close()


async def test_scripted_output_that_fits_passes_unchanged_and_eos_only_where_accepting():
    compiler = grammar_compiler()
    h = Harness({"a": '{"a":12,"b":"y"}'}, grammar=compiler)
    entry = await constrained_entry(compiler, 1, "a", GrammarSpec.json_schema(OBJECT))
    h.queue.append(entry)
    event = await h.final_event(entry)
    assert json.loads(event.ending.generated_text) == {"a": 12, "b": "y"}
    assert event.ending.finish_reason == "eos_token"
    masks = [step[1] for step in h.shard.masks if 1 in step]
    # EOS is never allowed before the object is complete; the grammar then ends the request.
    assert all(EOS not in allowed_tokens(mask) for mask in masks)
    assert len(masks) == len(event.ending.generated_text)
    h.close()


async def test_unconstrained_neighbours_get_no_mask_and_keep_their_text():
    compiler = grammar_compiler()
    h = Harness({"a": "abcdefgh", "b": "free text"}, grammar=compiler)
    constrained = await constrained_entry(compiler, 1, "a", GrammarSpec.regex("[a-c]+"))
    free = Entry(
        2, ValidRequest("b", (ord("b"),), SamplingParams(), StoppingParams(32)), tokenizer_info()
    )
    h.queue.append(constrained)
    h.queue.append(free)
    assert (await h.final_event(free)).ending.generated_text == "free text"
    assert (await h.final_event(constrained)).ending.generated_text == "abc"
    assert all(2 not in step for step in h.shard.masks)
    h.close()


async def test_a_grammar_cut_short_ends_with_length():
    compiler = grammar_compiler()
    h = Harness({"a": "12345"}, grammar=compiler)
    entry = await constrained_entry(compiler, 1, "a", GrammarSpec.regex("[0-9]{5}"), 3)
    h.queue.append(entry)
    event = await h.final_event(entry)
    assert (event.ending.generated_text, event.ending.finish_reason) == ("123", "length")
    h.close()


async def test_compiled_grammars_are_cached_by_kind_and_value():
    compiler = grammar_compiler()
    first = await compiler.compile(GrammarSpec.json_schema({"type": "integer", "minimum": 1}))
    again = await compiler.compile(GrammarSpec.json_schema({"type": "integer", "minimum": 1}))
    assert again.template is first.template
    other = await compiler.compile(GrammarSpec.regex("[1-9][0-9]*"))
    assert other.template is not first.template
    # Each sequence advances its own copy: EOS becomes allowed for one only.
    one, two = first.new_guide(), first.new_guide()
    assert one.accept(ord("5"))
    one_mask, two_mask = compiler.token_masks([(0, one), (1, two)])
    assert EOS in allowed_tokens(one_mask.bitmask)
    assert EOS not in allowed_tokens(two_mask.bitmask)


BAD_GRAMMARS = [
    ("regex", {"type": "regex", "value": "[a-"}, "invalid regex"),
    ("schema-type", {"type": "json", "value": {"type": "strin"}}, "Invalid type: strin"),
    ("schema-string", {"type": "json", "value": "{not json"}, "is not JSON"),
    ("schema-list", {"type": "json", "value": [1]}, "must be an object"),
    ("missing-ref", {"type": "json", "value": {"$ref": "#/$defs/x"}}, "does not exist"),
    (
        "ref-cycle",
        {
            "type": "json",
            "value": {
                "$ref": "#/$defs/a",
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}},
            },
        },
        "`$ref` cycle #/$defs/a -> #/$defs/b",
    ),
    (
        "unsatisfiable",
        {"type": "json", "value": {"type": "string", "minLength": 3, "maxLength": 1}},
        "minLength",
    ),
    ("bad-kind", {"type": "lark", "value": "x"}, 'unknown variant "lark"'),
    ("regex-not-str", {"type": "regex", "value": 5}, "expected a string"),
    ("no-value", {"type": "regex"}, "missing field `value`"),
]


@pytest.mark.parametrize("case", BAD_GRAMMARS, ids=[c[0] for c in BAD_GRAMMARS])
async def test_bad_grammars_get_422_naming_the_problem_and_others_still_run(case):
    _, grammar, message = case
    async with router(grammar=grammar_compiler()) as (client, _, _):
        body = {"inputs": "Hi", "parameters": {"grammar": grammar}}
        response = await client.post("/generate", json=body)
        good = await client.post(
            "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
        )
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    assert message in response.json()["error"]
    assert good.status_code == 200


async def test_grammar_over_the_size_budget_is_refused():
    compiler = grammar_compiler(GrammarConfig(max_grammar_bytes=1000))
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(100)}}
    async with router(grammar=compiler) as (client, _, _):
        body = {"inputs": "Hi", "parameters": {"grammar": {"type": "json", "value": schema}}}
        response = await client.post("/generate", json=body)
    assert response.status_code == 422
    assert "over the budget of 1000" in response.json()["error"]


async def test_grammar_over_the_symbol_budget_is_refused():
    compiler = grammar_compiler(GrammarConfig(max_grammar_symbols=200))
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(100)}}
    with pytest.raises(ValidationError, match="grammar size"):
        await compiler.compile(GrammarSpec.json_schema(schema))


async def test_grammar_over_the_time_budget_is_refused_then_served_from_the_cache():
    compiler = grammar_compiler(GrammarConfig(compile_timeout_s=0.01))
    pattern = {"type": "string", "pattern": "[a-z]{1,30}"}
    # About 0.3 s to compile on one core.
    spec = GrammarSpec.json_schema(
        {"type": "object", "properties": {f"p{i}": pattern for i in range(2000)}}
    )
    with pytest.raises(ValidationError, match=r"took longer than the budget of 0\.01s"):
        await compiler.compile(spec)
    for _ in range(100):  # the compile finishes in the background and is cached
        await asyncio.sleep(0.1)
        try:
            assert (await compiler.compile(spec)).spec == spec
            return
        except ValidationError:
            continue
    raise AssertionError("the grammar was never cached")


async def test_disabled_grammar_support_answers_as_tgi():
    async with router() as (client, _, _):
        body = {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "a"}}}
        response = await client.post("/generate", json=body)
    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: grammar is not supported",
        "error_type": "validation",
    }


async def test_generate_with_a_json_object_grammar_returns_valid_json():
    async with router(grammar=grammar_compiler()) as (client, _, allocator):
        body = {
            "inputs": "Hi",
            "parameters": {"grammar": {"type": "json_object", "value": json.dumps(OBJECT)}},
        }
        response = await client.post("/generate", json=body)
    assert response.status_code == 200
    value = json.loads(response.json()["generated_text"])
    assert set(value) == {"a", "b"} and isinstance(value["a"], int) and value["b"] in "xy"
    assert allocator.num_used_blocks == 0


async def test_min_new_tokens_cannot_fight_the_grammar():
    async with router(grammar=grammar_compiler()) as (client, _, _):
        grammar = {"type": "regex", "value": "a"}
        body = {"inputs": "Hi", "parameters": {"grammar": grammar, "min_new_tokens": 2}}
        response = await client.post("/generate", json=body)
    assert response.status_code == 422
    assert "`min_new_tokens` cannot be used with `grammar`" in response.json()["error"]


def test_recursion_through_properties_is_not_a_cycle():
    tree = {
        "$ref": "#/$defs/node",
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        },
    }
    check_ref_cycles(tree)  # no error

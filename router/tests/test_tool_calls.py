"""Tool calls as JSON: the schema each tool_choice allows, and reading calls back (whole and
streamed) with the real grammar engine writing the text."""

from __future__ import annotations

import asyncio
import json

from router_fakes import grammar_compiler

from textgen.router.grammar import GrammarSpec
from textgen.router.tool_calls import (
    NO_TOOL,
    ToolCall,
    ToolCallStream,
    parse_tool_call,
    tool_call_schema,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "a",
            "parameters": {
                "type": "object",
                "properties": {"x": {"type": "integer"}},
                "required": ["x"],
            },
        },
    },
    {"type": "function", "function": {"name": "b"}},
]


def names(schema: dict) -> list[str]:
    calls = schema.get("anyOf", [schema])
    return [call["properties"]["name"]["const"] for call in calls]


def test_tool_choice_picks_the_functions_the_grammar_allows():
    assert names(tool_call_schema(TOOLS, "required")) == ["a", "b"]
    assert names(tool_call_schema(TOOLS, {"type": "function", "function": {"name": "b"}})) == ["b"]
    assert names(tool_call_schema(TOOLS, "auto")) == ["a", "b", NO_TOOL]


def test_calls_parse_and_no_tool_is_text():
    assert parse_tool_call('{"name":"a","arguments":{"x":1}}') == ToolCall("a", '{"x": 1}')
    assert parse_tool_call('{"name":"no_tool","arguments":{"content":"hi"}}') == "hi"
    assert parse_tool_call('{"name":"a","argu') is None


def test_the_engine_writes_name_first_and_the_stream_adds_up():
    compiler = grammar_compiler()

    async def write() -> str:
        compiled = await compiler.compile(
            GrammarSpec.json_schema(tool_call_schema(TOOLS, "required"))
        )
        guide = compiled.new_guide()
        text = '{"name":"a","arguments":{"x":42}}'
        assert all(guide.accept(ord(c)) for c in text)
        return text

    text = asyncio.run(write())
    stream = ToolCallStream()
    deltas = [d for c in text for d in stream.feed(c)]
    last, content = stream.finish()
    deltas += last
    assert content is None
    assert deltas[0]["function"] == {"name": "a", "arguments": ""}
    assert json.loads("".join(d["function"].get("arguments", "") for d in deltas[1:])) == {"x": 42}


def test_a_no_tool_answer_streams_as_text_at_the_end():
    stream = ToolCallStream()
    assert stream.feed('{"name":"no_tool","arguments":{"content":"hi there"}}') == []
    assert stream.finish() == ([], "hi there")

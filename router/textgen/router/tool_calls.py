"""OpenAI tool calls through a grammar: the JSON a call must be, and reading it back.

The model writes one call as `{"name": "<function>", "arguments": {...}}`, held
to that shape by a JSON schema grammar: `name` is a `const`, `arguments` the
function's `parameters` schema. `tool_choice` picks which functions the schema
allows (a named one, or any for `required`); `auto` adds TGI's `no_tool`
function whose one argument is a plain answer, so the model can still choose
to answer in text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

NO_TOOL = "no_tool"
_NO_TOOL_PARAMETERS = {
    "type": "object",
    "properties": {"content": {"type": "string", "description": "The answer, with no tool"}},
    "required": ["content"],
}


def tool_call_schema(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any]:
    """The JSON schema of one call, for `tool_choice` auto, required or a named function."""
    functions = [tool["function"] for tool in tools]
    if isinstance(choice, dict):
        functions = [f for f in functions if f["name"] == choice["function"]["name"]]
    elif choice == "auto":
        functions = [*functions, {"name": NO_TOOL, "parameters": _NO_TOOL_PARAMETERS}]
    calls = [_call_schema(f["name"], f.get("parameters") or {"type": "object"}) for f in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """The arguments object as JSON text, as OpenAI sends it."""

    def to_json(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def parse_tool_call(text: str) -> ToolCall | str | None:
    """The call the text holds; for `no_tool`, its answer as text; None if incomplete."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if call["name"] == NO_TOOL and isinstance(arguments, dict):
        return str(arguments.get("content", ""))
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Streams a call as OpenAI's deltas: the name once known, then the arguments' text.

    The grammar writes `{"name":"<name>","arguments":` first (properties in
    schema order, no whitespace), so the name is known before any argument
    text; the call's closing brace is held back and dropped at the end.
    `no_tool` answers are not streamed: their text is sent whole at the end.
    """

    _ARGUMENTS = ',"arguments":'

    def __init__(self) -> None:
        self._text = ""
        self._name: str | None = None
        self._sent = 0
        """Characters of the arguments already sent."""

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The tool_calls deltas this text adds (possibly none)."""
        self._text += text
        deltas = []
        if self._name is None:
            self._name = self._read_name()
            if self._name is None or self._name == NO_TOOL:
                return []
            deltas.append(ToolCall(self._name, "").to_json(0))
        if self._name == NO_TOOL:
            return []
        arguments = self._arguments()[:-1]  # the last character may be the call's "}"
        if len(arguments) > self._sent:
            deltas.append({"index": 0, "function": {"arguments": arguments[self._sent :]}})
            self._sent = len(arguments)
        return deltas

    def finish(self) -> tuple[list[dict[str, Any]], str | None]:
        """The last argument deltas, or for `no_tool` (or an unfinished call) the text."""
        parsed = parse_tool_call(self._text)
        if isinstance(parsed, str):
            return [], parsed
        if self._name is None or self._name == NO_TOOL:
            return [], self._text
        arguments = self._arguments()
        if parsed is not None:
            arguments = arguments[:-1]  # drop the call's closing brace
        rest = arguments[self._sent :]
        self._sent = len(arguments)
        return ([{"index": 0, "function": {"arguments": rest}}] if rest else []), None

    def _read_name(self) -> str | None:
        at = self._text.find(self._ARGUMENTS)
        if at < 0:
            return None
        try:
            return json.loads(self._text[:at] + "}")["name"]
        except (ValueError, KeyError, TypeError):
            return None

    def _arguments(self) -> str:
        at = self._text.find(self._ARGUMENTS)
        return self._text[at + len(self._ARGUMENTS) :] if at >= 0 else ""

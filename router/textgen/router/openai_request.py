"""OpenAI request bodies to TGI generate bodies: one per choice, plus how to answer.

The OpenAI layer is a translation: `/v1/chat/completions` and `/v1/completions`
become TGI bodies `{"inputs", "parameters"}` that go through the same
validation, queue and batching as `/generate`. What TGI's parameters cannot
say (echo, the logprobs format, usage in the stream) stays in the `Plan`.
Shape errors are OpenAI's 400 with `param`; range checks that TGI's
validation already makes (lengths, top-n, stop count) are left to it (422).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from textgen.router.chat import ChatError, ChatTemplate
from textgen.router.tool_calls import tool_call_schema

# Upper bound on `n` (choices per prompt); each choice is a request of its own.
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Plan:
    """One OpenAI request: a TGI body per choice, in choice order, and the answer's options."""

    bodies: tuple[dict[str, Any], ...]
    prompts: tuple[str, ...]
    """The prompt of each choice (prompt i of a completions list serves choices i*n..i*n+n-1)."""
    n: int
    """Choices per prompt."""
    stream: bool
    include_usage: bool
    logprobs: int | None
    """None: no logprobs; else how many alternatives per token (0 allowed)."""
    echo: bool = False
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    tool_call: bool = False
    """The output is a tool call (tool_choice auto, required or named): answer `tool_calls`."""


def chat_plan(body: Any, template: ChatTemplate, vocab_size: int) -> Plan:
    body = _object(body)
    tools, choice = _tools(body)
    grammar = _response_format(body.get("response_format"))
    if choice != "none":
        # NOTE: a tool call's schema takes the place of any response_format.
        assert tools is not None
        grammar = {"type": "json", "value": tool_call_schema(tools, choice)}
    logprobs = None
    if _get(body, "logprobs", bool, False):
        logprobs = _bounded(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    elif body.get("top_logprobs") is not None:
        raise ChatError("`top_logprobs` needs `logprobs` set to true", "top_logprobs")
    prompt = template.render(body.get("messages"), tools)
    plan = _plan(body, [prompt], logprobs, echo=False, vocab_size=vocab_size, grammar=grammar)
    return dataclasses.replace(plan, tool_call=choice != "none")


def completion_plan(body: Any, vocab_size: int) -> Plan:
    body = _object(body)
    if body.get("suffix"):
        raise ChatError("`suffix` is not supported", "suffix")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _bounded(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, 0)
    echo = _get(body, "echo", bool, False)
    return _plan(body, _prompts(body.get("prompt")), logprobs, echo, vocab_size)


def _plan(
    body: dict[str, Any],
    prompts: list[str],
    logprobs: int | None,
    echo: bool,
    vocab_size: int,
    grammar: dict[str, Any] | None = None,
) -> Plan:
    n = _bounded(body, "n", 1, MAX_CHOICES, 1)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise ChatError("`best_of` other than `n` is not supported", "best_of")
    logit_bias = _logit_bias(body.get("logit_bias"), vocab_size)
    stream = _get(body, "stream", bool, False)
    include_usage = _stream_options(body, stream)
    parameters = _parameters(body, logprobs, echo)
    if grammar is not None:
        parameters["grammar"] = grammar
    seed = parameters.pop("seed", None)
    bodies, choice_prompts = [], []
    for prompt in prompts:
        for index in range(n):
            choice = dict(parameters)
            if seed is not None:
                # NOTE: choice i gets seed + i: distinct samples, reproducible as a whole.
                choice["seed"] = (seed + index) % 2**64
            bodies.append({"inputs": prompt, "parameters": choice})
            choice_prompts.append(prompt)
    return Plan(
        bodies=tuple(bodies),
        prompts=tuple(choice_prompts),
        n=n,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        echo=echo,
        stop=tuple(parameters["stop"]),
        logit_bias=logit_bias,
    )


def _parameters(body: dict[str, Any], logprobs: int | None, echo: bool) -> dict[str, Any]:
    """TGI `parameters` shared by every choice of the request."""
    parameters: dict[str, Any] = {
        "stop": _stop(body.get("stop")),
        "top_n_tokens": logprobs or 0,
        "decoder_input_details": echo and logprobs is not None,
        "ignore_eos_token": _get(body, "ignore_eos", bool, False),
        # textgen's extension, as TGI's `parameters.watermark`.
        "watermark": _get(body, "watermark", bool, False),
    }
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None:
        parameters["max_new_tokens"] = _bounded(body, name, 1, 2**31, None)
    parameters.update(_sampling(body))
    return parameters


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    # OpenAI's default temperature is 1 and it samples; 0 means greedy (TGI rejects 0).
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise ChatError("`top_p` must be > 0 and <= 1", "top_p")
    sampling: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0 and temperature != 1.0:
        sampling["temperature"] = temperature
    if temperature > 0 and top_p < 1.0:
        sampling["top_p"] = top_p
    for name in ("frequency_penalty", "presence_penalty"):
        value = _number(body, name, -2.0, 2.0, 0.0)
        if value:
            sampling[name] = value
    seed = _get(body, "seed", int, None)
    if seed is not None:
        sampling["seed"] = seed % 2**64  # OpenAI's seeds are signed 64-bit
    # vLLM's extensions that TGI also has.
    for name, kind in (("top_k", int), ("repetition_penalty", (int, float))):
        value = _get(body, name, kind, None)
        if value is not None and value != -1:
            sampling[name] = value
    return sampling


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ChatError("the request body must be a JSON object")
    return body


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
        raise ChatError(f"`{name}` must be {' or '.join(names[k] for k in kinds)}", name)
    return value


def _bounded(body: dict[str, Any], name: str, low: int, high: int, default: Any) -> Any:
    value = _get(body, name, int, default)
    if value is not None and not low <= value <= high:
        raise ChatError(f"`{name}` must be >= {low} and <= {high}; got {value}", name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = float(_get(body, name, (int, float), default))
    if not low <= value <= high:
        raise ChatError(f"`{name}` must be >= {low} and <= {high}; got {value}", name)
    return value


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ChatError("`stop` must be a non-empty string or an array of them", "stop")
    return stops


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ChatError("`stream_options` is only allowed when `stream` is true", "stream_options")
    if not isinstance(options, dict):
        raise ChatError("`stream_options` must be an object", "stream_options")
    return bool(_get(options, "include_usage", bool, False))


def _prompts(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise ChatError("`prompt` must be a string or a non-empty array of strings", "prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise ChatError("`prompt` as token ids is not supported: send text", "prompt")
    return prompts


def _logit_bias(bias: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}` as sorted (id, bias) pairs, ids below `vocab_size`."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ChatError("`logit_bias` must be an object of token id -> bias", "logit_bias")
    pairs = []
    for token, value in bias.items():
        if not token.isdigit() or int(token) >= vocab_size:
            raise ChatError(
                f"`logit_bias` key {token!r} is not a token id (0 to {vocab_size - 1})",
                "logit_bias",
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ChatError("`logit_bias` values must be numbers", "logit_bias")
        if not -100 <= value <= 100:
            raise ChatError("`logit_bias` values must be >= -100 and <= 100", "logit_bias")
        pairs.append((int(token), float(value)))
    return tuple(sorted(pairs))


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    """Validate `tools`/`tool_choice`: the tools to render, and the choice ("none" if no call)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    names = tool_names(tools) if tools is not None else []
    if choice is None:
        choice = "auto" if names else "none"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ChatError(
                "`tool_choice` must be 'auto', 'none', 'required' or a named function",
                "tool_choice",
            )
    else:
        _named_tool_choice(choice, names)
    if choice != "none" and not names:
        raise ChatError("`tool_choice` needs `tools`", "tool_choice")
    return tools or None, choice


def tool_names(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        raise ChatError("`tools` must be an array", "tools")
    names = []
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ChatError(f"`{param}.type` must be 'function'", param)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ChatError(f"`{param}.function` must be an object", f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise ChatError(
                f"`{param}.function.name` must be 1-64 letters, digits, '_' or '-'",
                f"{param}.function.name",
            )
        if name in names:
            raise ChatError(f"tool name {name!r} is given twice", f"{param}.function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ChatError(
                f"`{param}.function.parameters` must be a JSON schema object",
                f"{param}.function.parameters",
            )
        names.append(name)
    return names


def _named_tool_choice(choice: Any, names: list[str]) -> None:
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise ChatError("a named `tool_choice` must have type 'function'", "tool_choice")
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if name not in names:
        raise ChatError(f"`tool_choice` names {name!r}, which is not in `tools`", "tool_choice")


def _response_format(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's `text`/`json_object`/`json_schema` and TGI's `json`/`regex` aliases.

    Returns the TGI `grammar` parameter that enforces the format, if any.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ChatError("`response_format` must be an object", "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object" and response_format.get("value") is not None:
        # TGI's alias of `json`, as huggingface_hub sends a json_schema format.
        return {"type": "json", "value": _json_schema(response_format["value"])}
    if kind == "json_object":
        return {"type": "json", "value": {"type": "object"}}
    if kind == "json_schema":
        schema = response_format.get("json_schema")
        if schema is None:
            schema = response_format.get("value")  # TGI's alias
        return {"type": "json", "value": _json_schema(schema)}
    if kind == "json":
        # huggingface_hub sends OpenAI's {"name", "schema"} wrapper as TGI's value.
        return {"type": "json", "value": _json_schema(response_format.get("value"))}
    if kind == "regex":
        if not isinstance(response_format.get("value"), str):
            raise ChatError("`response_format.value` must be a regex string", "response_format")
        return {"type": "regex", "value": response_format["value"]}
    raise ChatError(
        "`response_format.type` must be 'text', 'json_object', 'json_schema', 'json' "
        f"or 'regex'; got {kind!r}",
        "response_format",
    )


def _json_schema(schema: Any) -> Any:
    if not isinstance(schema, dict):
        raise ChatError("`response_format.json_schema` must be an object", "response_format")
    if "schema" in schema or "name" in schema:
        name = schema.get("name")
        if name is not None and (not isinstance(name, str) or not _TOOL_NAME.match(name)):
            raise ChatError(
                "`response_format.json_schema.name` must be 1-64 letters, digits, '_' or '-'",
                "response_format",
            )
        return _json_schema_value(schema.get("schema", {}))
    return _json_schema_value(schema)  # TGI's form: the schema itself


def _json_schema_value(schema: Any) -> Any:
    if not isinstance(schema, (dict, bool)):
        raise ChatError("the JSON schema of `response_format` must be an object", "response_format")
    return schema

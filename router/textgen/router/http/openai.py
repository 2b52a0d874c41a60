"""OpenAI's routes: chat and text completions, models, and TGI's /chat_tokenize.

Each request is translated (openai_request.py) into one TGI body per choice,
submitted through `Infer` like any /generate request, and its events are
answered in OpenAI's shapes (openai_response.py). Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`; in a stream, an error chunk
followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from textgen.router.chat import ChatError, ChatTemplate
from textgen.router.errors import RouterError, ValidationError
from textgen.router.http.app import EntryStream, RouterState, cancel_on_disconnect, read_json
from textgen.router.http.errors import error_json, error_response, openai_error
from textgen.router.infer import Infer
from textgen.router.openai_request import Plan, chat_plan, completion_plan, tool_names
from textgen.router.openai_response import (
    Choice,
    Envelope,
    StopHoldback,
    chat_logprobs,
    completion_logprobs,
    merge_logprobs,
    trim_stop,
    usage_json,
)
from textgen.router.request import Entry, StreamEvent
from textgen.router.tool_calls import ToolCall, ToolCallStream, parse_tool_call

# TGI's parameter names in validation messages, as the OpenAI client spelled them.
_COMMON_NAMES = {"max_new_tokens": "max_tokens", "ignore_eos_token": "ignore_eos"}
_CHAT_NAMES = {**_COMMON_NAMES, "inputs": "messages", "top_n_tokens": "top_logprobs"}
_COMPLETION_NAMES = {**_COMMON_NAMES, "inputs": "prompt", "top_n_tokens": "logprobs"}


def openai_routes() -> list[Route]:
    created = int(time.time())
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", functools.partial(list_models, created=created), methods=["GET"]),
        Route(
            "/v1/models/{model:path}",
            functools.partial(retrieve_model, created=created),
            methods=["GET"],
        ),
        Route("/chat_tokenize", chat_tokenize, methods=["POST"]),
    ]


# --- the two completion routes ---


class _Format:
    """What differs between chat and text completions."""

    object = ""
    chunk_object = ""
    prefix = ""
    names: dict[str, str] = {}

    def plan(self, body: Any, state: RouterState) -> Plan:
        raise NotImplementedError

    def choice_json(self, choice: Choice, plan: Plan) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self, index: int, plan: Plan) -> dict[str, Any] | None:
        raise NotImplementedError

    def delta(self, index: int, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, index: int, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def event_logprobs(self, event: StreamEvent, offset: int) -> dict[str, Any] | None:
        raise NotImplementedError


class _Chat(_Format):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl"
    names = _CHAT_NAMES

    def plan(self, body: Any, state: RouterState) -> Plan:
        tokenizer = state.infer.tokenizer_info.tokenizer
        return chat_plan(body, ChatTemplate(tokenizer), _vocab_size(tokenizer))  # type: ignore[arg-type]

    def choice_json(self, choice: Choice, plan: Plan) -> dict[str, Any]:
        assert choice.ending is not None
        logprobs = None
        if plan.logprobs is not None:
            logprobs = chat_logprobs(choice.tokens, choice.top_tokens)
        content = trim_stop(choice.ending.generated_text, plan.stop)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        finish_reason = choice.finish_reason
        call = parse_tool_call(content) if plan.tool_call else None
        if isinstance(call, ToolCall):
            message = {"role": "assistant", "content": None, "tool_calls": [call.to_json()]}
            finish_reason = "tool_calls"
        elif isinstance(call, str):
            message["content"] = call  # tool_choice auto: the model chose to answer in text
        return {
            "index": choice.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }

    def opening(self, index: int, plan: Plan) -> dict[str, Any] | None:
        return _chunk_choice(index, {"role": "assistant", "content": ""})

    def delta(self, index: int, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return _chunk_choice(index, {"content": text}, logprobs)

    def finish(self, index: int, finish_reason: str) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}

    def event_logprobs(self, event: StreamEvent, offset: int) -> dict[str, Any] | None:
        if event.token.special:
            return None
        return chat_logprobs([event.token], [event.top_tokens])


class _Completion(_Format):
    object = "text_completion"
    chunk_object = "text_completion"
    prefix = "cmpl"
    names = _COMPLETION_NAMES

    def plan(self, body: Any, state: RouterState) -> Plan:
        return completion_plan(body, _vocab_size(state.infer.tokenizer_info.tokenizer))

    def choice_json(self, choice: Choice, plan: Plan) -> dict[str, Any]:
        assert choice.ending is not None
        prompt = plan.prompts[choice.index] if plan.echo else ""
        logprobs = None
        if plan.logprobs is not None:
            logprobs = completion_logprobs(choice.tokens, choice.top_tokens, len(prompt))
            if plan.echo:
                prefill = completion_logprobs(list(choice.ending.prefill), None, 0)
                logprobs = merge_logprobs(prefill, logprobs)
        return {
            "index": choice.index,
            "text": prompt + trim_stop(choice.ending.generated_text, plan.stop),
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        }

    def opening(self, index: int, plan: Plan) -> dict[str, Any] | None:
        if not plan.echo:
            return None
        return self.delta(index, plan.prompts[index], None)

    def delta(self, index: int, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def finish(self, index: int, finish_reason: str) -> dict[str, Any]:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}

    def event_logprobs(self, event: StreamEvent, offset: int) -> dict[str, Any] | None:
        return completion_logprobs([event.token], [event.top_tokens], offset)


def _vocab_size(tokenizer: Any) -> int:
    """Token ids the tokenizer knows (added tokens included): what `logit_bias` may name."""
    return len(tokenizer)


def _chunk_choice(
    index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}


async def chat_completions(request: Request) -> Response:
    return await _serve(request, _Chat())


async def completions(request: Request) -> Response:
    return await _serve(request, _Completion())


async def _serve(request: Request, fmt: _Format) -> Response:
    state: RouterState = request.app.state.router
    try:
        body = await read_json(request, state.payload_limit)
        plan = fmt.plan(body, state)
        entries = await _submit_all(state.infer, plan)
    except RouterError as error:
        return openai_error(error, fmt.names)
    info = state.info
    kind = fmt.chunk_object if plan.stream else fmt.object
    envelope = Envelope.new(kind, fmt.prefix, info["model_id"], _fingerprint(info))
    if plan.stream:
        stream = _chunks(state.infer, entries, plan, fmt, envelope)
        return EntryStream(stream, state, entries)
    return await _complete(request, state.infer, entries, plan, fmt, envelope)


def _fingerprint(info: dict[str, Any]) -> str:
    return f"{info.get('version', '')}-{info.get('docker_label') or 'native'}"


async def _submit_all(infer: Infer, plan: Plan) -> list[Entry]:
    """Admit every choice or none: a refusal finishes the ones already admitted."""
    entries: list[Entry] = []
    try:
        for body in plan.bodies:
            entries.append(await infer.submit(body, plan.logit_bias))
    except BaseException:
        for entry in entries:
            infer.finish(entry)
        raise
    return entries


async def _merged(infer: Infer, entries: list[Entry]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """Every entry's events, as they come, tagged with the entry's index."""
    if len(entries) == 1:
        async for event in infer.events(entries[0]):
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, StreamEvent | RouterError]] = asyncio.Queue()

    async def pump(index: int, entry: Entry) -> None:
        try:
            async for event in infer.events(entry):
                queue.put_nowait((index, event))
        except RouterError as error:
            queue.put_nowait((index, error))

    tasks = [asyncio.create_task(pump(i, entry)) for i, entry in enumerate(entries)]
    try:
        for _ in range(len(entries)):
            while True:
                index, item = await queue.get()
                if isinstance(item, RouterError):
                    raise item
                yield index, item
                if item.ending is not None:
                    break
    finally:
        for task in tasks:
            task.cancel()


async def _complete(
    request: Request,
    infer: Infer,
    entries: list[Entry],
    plan: Plan,
    fmt: _Format,
    envelope: Envelope,
) -> Response:
    watcher = asyncio.create_task(cancel_on_disconnect(request, entries))
    choices = [Choice(index) for index in range(len(entries))]
    try:
        async for index, event in _merged(infer, entries):
            choices[index].add(event)
    except RouterError as error:
        return openai_error(error, fmt.names)
    finally:
        watcher.cancel()
        for entry in entries:
            infer.finish(entry)
    body = envelope.wrap(
        [fmt.choice_json(choice, plan) for choice in choices],
        usage=usage_json(choices, _prompt_lengths(entries, plan)),
    )
    return JSONResponse(body)


def _prompt_lengths(entries: list[Entry], plan: Plan) -> list[int]:
    """Input length of each distinct prompt: the n choices of a prompt count it once."""
    return [entry.request.input_len for entry in entries[:: plan.n]]


# --- streaming ---


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _chunks(
    infer: Infer, entries: list[Entry], plan: Plan, fmt: _Format, envelope: Envelope
) -> AsyncIterator[bytes]:
    # OpenAI's chunks carry `usage: null` until the usage chunk, when it is asked for.
    chunk = functools.partial(envelope.wrap, **({"usage": None} if plan.include_usage else {}))
    choices = [Choice(index) for index in range(len(entries))]
    holdbacks = [StopHoldback(plan.stop) for _ in entries]
    offsets = [len(plan.prompts[i]) if plan.echo else 0 for i in range(len(entries))]
    tool_calls = [ToolCallStream() for _ in entries] if plan.tool_call else []
    for index in range(len(entries)):
        opening = fmt.opening(index, plan)
        if opening is not None:
            yield _sse(chunk([opening]))
    try:
        async for index, event in _merged(infer, entries):
            choice = choices[index]
            choice.add(event)
            text = "" if event.token.special else holdbacks[index].feed(event.token.text)
            if event.ending is not None:
                text += holdbacks[index].flush()
            if tool_calls:
                for data in _tool_call_chunks(tool_calls[index], choice, text):
                    yield _sse(chunk([data]))
                continue
            logprobs = None
            if plan.logprobs is not None:
                logprobs = fmt.event_logprobs(event, offsets[index])
            offsets[index] += len(event.token.text)
            if text or logprobs:
                yield _sse(chunk([fmt.delta(index, text, logprobs)]))
            if choice.finish_reason is not None:
                yield _sse(chunk([fmt.finish(index, choice.finish_reason)]))
        if plan.include_usage:
            usage = usage_json(choices, _prompt_lengths(entries, plan))
            yield _sse(envelope.wrap([], usage=usage))
    except RouterError as error:
        yield _sse(error_json(error, fmt.names))
    yield _DONE


def _tool_call_chunks(stream: ToolCallStream, choice: Choice, text: str) -> list[dict[str, Any]]:
    """A tool call's stream: `tool_calls` deltas, then finish_reason "tool_calls".

    A `no_tool` answer (tool_choice auto) or a call cut short by length comes
    as content once the request ends.
    """
    deltas = stream.feed(text)
    chunks = [_chunk_choice(choice.index, {"tool_calls": [d]}) for d in deltas]
    if choice.finish_reason is None:
        return chunks
    last, content = stream.finish()
    chunks += [_chunk_choice(choice.index, {"tool_calls": [d]}) for d in last]
    if content is not None:
        chunks.append(_chunk_choice(choice.index, {"content": content}))
        return [*chunks, _Chat().finish(choice.index, choice.finish_reason)]
    return [*chunks, _Chat().finish(choice.index, "tool_calls")]


# --- models and chat_tokenize ---


def _model_json(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "textgen"}


async def list_models(request: Request, created: int) -> Response:
    model_id = request.app.state.router.info["model_id"]
    return JSONResponse({"object": "list", "data": [_model_json(model_id, created)]})


async def retrieve_model(request: Request, created: int) -> Response:
    model_id = request.app.state.router.info["model_id"]
    if request.path_params["model"] != model_id:
        error = RouterError(f"The model {request.path_params['model']!r} does not exist")
        error.status, error.error_type = 404, "model_not_found"
        return openai_error(error)
    return JSONResponse(_model_json(model_id, created))


async def chat_tokenize(request: Request) -> Response:
    """TGI's /chat_tokenize: the templated prompt and its tokens with character offsets."""
    state: RouterState = request.app.state.router
    tokenizer = state.infer.tokenizer_info.tokenizer
    try:
        body = await read_json(request, state.payload_limit)
        if not isinstance(body, dict):
            raise ValidationError("the request body must be a JSON object")
        text = ChatTemplate(tokenizer).render(body.get("messages"), _renderable_tools(body))  # type: ignore[arg-type]
    except ChatError as error:
        return error_response(ValidationError(error.message))  # TGI's status: 422
    except RouterError as error:
        return error_response(error)
    encoding = await asyncio.to_thread(tokenizer, text, return_offsets_mapping=True)  # type: ignore[operator]
    tokens = [
        {"id": token_id, "text": text[start:stop], "start": start, "stop": stop}
        for token_id, (start, stop) in zip(
            encoding["input_ids"], encoding["offset_mapping"], strict=True
        )
    ]
    return JSONResponse({"tokenize_response": tokens, "templated_text": text})


def _renderable_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    tool_names(tools)
    return tools

"""Chat messages to a prompt: the model's own chat template, rendered as transformers does.

The template is the jinja string of the tokenizer config; transformers'
`apply_chat_template` renders it (sandboxed jinja, `raise_exception`,
`add_generation_prompt`), so a chat prompt here is byte for byte the prompt
the model was trained with. Messages are normalized first: content-part lists
become one string and an assistant turn made only of tool calls gets "" as its
content, because most templates concatenate `message['content']`.
"""

from __future__ import annotations

from typing import Any, Protocol

from textgen.router.errors import ValidationError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class ChatTokenizer(Protocol):
    chat_template: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class ChatError(ValidationError):
    """A malformed chat request (OpenAI's 400); `param` names the offending field."""

    status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ChatTemplate:
    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def available(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def render(self, messages: Any, tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt for `messages`, ending with the assistant's turn opened."""
        if not self.available:
            raise ChatError(
                "This model has no chat template: use /v1/completions or /generate with a "
                "prompt, or serve a model whose tokenizer_config.json has a `chat_template`",
                "messages",
            )
        conversation = normalize_messages(messages)
        try:
            return self._tokenizer.apply_chat_template(
                conversation, tools=tools, add_generation_prompt=True, tokenize=False
            )
        except Exception as error:  # jinja's TemplateError, raise_exception, TypeError
            raise ChatError(f"The chat template failed to render: {error}", "messages") from error


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ChatError("`messages` must be a non-empty array", "messages")
    return [_message(message, index) for index, message in enumerate(messages)]


def _message(message: Any, index: int) -> dict[str, Any]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ChatError(f"`{param}` must be an object", param)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise ChatError(
            f"`{param}.role` must be one of {', '.join(sorted(ROLES))}; got {_shown(role)}",
            f"{param}.role",
        )
    normalized = {k: v for k, v in message.items() if v is not None}
    normalized["content"] = _content(message.get("content"), f"{param}.content")
    if role != "assistant" and "tool_calls" in normalized:
        raise ChatError(f"`{param}.tool_calls` is only allowed on assistant messages", param)
    if message.get("content") is None and "tool_calls" not in normalized:
        raise ChatError(f"`{param}.content` is required", f"{param}.content")
    return normalized


def _shown(value: Any) -> str:
    """A client's value in an error message: a short string as itself, else its JSON type."""
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    kinds = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _content(content: Any, param: str) -> str:
    """A string, or a list of text parts joined (as TGI does); None for tool-call turns."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatError(f"`{param}` must be a string or an array of content parts", param)
    texts = []
    for index, part in enumerate(content):
        part_param = f"{param}[{index}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatError(
                f"`{part_param}`: only text content parts are supported; got {kind!r}", part_param
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatError(f"`{part_param}.text` must be a string", part_param)
        texts.append(text)
    return "".join(texts)

"""Client JSON that would otherwise crash the router: nesting, lone surrogates, constants;
and the limits validation puts on what a request may ask for (regexes, stop sequences)."""

import pytest
from router_fakes import CharTokenizer

from textgen.router.errors import ValidationError
from textgen.router.grammar import stacked_quantifier
from textgen.router.json_input import MAX_DEPTH, JsonInputError, loads
from textgen.router.validation import MAX_STOP_SEQUENCE_CHARS, Validation, ValidationLimits


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_is_accepted_up_to_the_limit_and_refused_past_it():
    assert loads(nested(MAX_DEPTH)) is not None
    with pytest.raises(JsonInputError, match="recursion limit exceeded"):
        loads(nested(MAX_DEPTH + 1))
    with pytest.raises(JsonInputError, match="recursion limit exceeded"):
        loads('{"inputs": ' + nested(100_000) + "}")  # past the decoder's own recursion limit
    objects = '{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)
    with pytest.raises(JsonInputError, match="recursion limit exceeded"):
        loads(objects)


@pytest.mark.parametrize(
    "document",
    [
        '"\\ud800"',
        '{"inputs": "ok \\udfff"}',
        '{"\\ud800": 1}',  # a key
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udbff"}]}]}',
    ],
)
def test_lone_surrogates_are_refused_wherever_they_are(document):
    with pytest.raises(JsonInputError, match="lone surrogate"):
        loads(document)


def test_valid_unicode_and_surrogate_pairs_pass():
    assert loads('{"inputs": "caf\\u00e9 \\ud83d\\ude00 日本"}') == {"inputs": "café 😀 日本"}


@pytest.mark.parametrize(
    "document", ["NaN", '{"x": Infinity}', "[-Infinity]", "{not json", b"\xff"]
)
def test_what_is_not_json_is_a_400(document):
    with pytest.raises(JsonInputError) as caught:
        loads(document)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("pattern", "at"),
    [
        ("foo**", 4),
        ("a+*", 2),
        ("a{2}+", 4),
        ("a{2,}{3}", 5),
        ("a*??", 3),
        ("x{,3}*", 5),
        ("a*?", None),  # lazy
        ("a{2}?", None),
        ("(?:a*)*", None),
        ("[*+]*", None),  # quantifier characters inside a class are literal
        ("[]*]+", None),
        ("\\**", None),  # an escaped star is an atom
        ("a{x}*", None),  # `{x}` is literal
        ("[0-9]{3}-[0-9]{4}", None),
    ],
)
def test_stacked_quantifiers_are_found(pattern, at):
    assert stacked_quantifier(pattern) == at


async def test_stop_sequences_longer_than_the_cap_are_refused():
    validation = Validation(CharTokenizer().encode, ValidationLimits(32, 64, max_stop_sequences=2))
    ok = {"inputs": "Hi", "parameters": {"stop": ["x" * MAX_STOP_SEQUENCE_CHARS]}}
    assert (await validation.validate(ok)).stopping.stop_sequences == (
        "x" * MAX_STOP_SEQUENCE_CHARS,
    )
    too_long = {"inputs": "Hi", "parameters": {"stop": ["ok", "x" * 1_000_000]}}
    with pytest.raises(ValidationError, match=r"at most 1024 characters long\. Given: 1000000"):
        await validation.validate(too_long)

"""Seeded synthetic prompts of an approximate token length."""

import random

# Short, common words: each is about one token for the usual BPE vocabularies.
_WORD_LIST = (
    "the of and to in is was for on are with as at be this have from or one had by but not "
    "what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has "
    "look two more write go see number no way could people my than first water been call "
    "who oil its now find long down day did get come made may part over new sound take only "
    "little work know place year live me back give most very after thing our just name good "
    "man think say great where help through much before line right too mean old any same "
    "tell boy follow came want show also around form three small set put end does another"
)
WORDS = tuple(_WORD_LIST.split())


def make_prompts(num_prompts: int, num_words: int, seed: int) -> list[str]:
    """`num_prompts` prompts of `num_words` words each, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=num_words)) for _ in range(num_prompts)]


def with_shared_prefix(prompts: list[str], num_words: int, seed: int) -> list[str]:
    """`prompts`, each after the same seeded prefix of `num_words` words (none if 0)."""
    if not num_words:
        return prompts
    prefix = make_prompts(1, num_words, seed + 1_000_003)[0]
    return [f"{prefix}\n{prompt}" for prompt in prompts]

from textgen.router.detokenizer import IncrementalDetokenizer
from textgen.router.stop import StopSequenceMatcher


class ByteTokenizer:
    """Tokens are UTF-8 bytes, so one character can span several tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_holds_back_partial_utf8_and_concatenates_exactly():
    text = "naïve café, 東京 🚀 done"
    detokenizer = IncrementalDetokenizer(ByteTokenizer(), list(b"prompt "))
    pieces = [detokenizer.step(b) for b in text.encode()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # The rocket is 4 bytes: three steps emit nothing, the fourth emits it whole.
    rocket = text.encode().index("🚀".encode())
    assert pieces[rocket : rocket + 4] == ["", "", "", "🚀"]


def test_detokenizer_with_real_tokenizer_spacing(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "Ġhello": 1, "Ġworld": 2, "hello": 3, "!": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()

    class Wrapped:
        def decode(self, ids, skip_special_tokens=False):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    detokenizer = IncrementalDetokenizer(Wrapped(), [3])
    assert [detokenizer.step(i) for i in (1, 2, 4)] == [" hello", " world", "!"]


def test_stop_sequence_found_across_token_boundaries():
    matcher = StopSequenceMatcher(("<END>", "xyz"))
    assert [matcher.feed(piece) for piece in ["abc <E", "N", "D> tail"]] == [None, None, "<END>"]


def test_stop_matcher_keeps_a_bounded_tail():
    matcher = StopSequenceMatcher(("stop",))
    for _ in range(10_000):
        assert matcher.feed("go on ") is None
    assert len(matcher._tail) == 3
    assert matcher.feed("sto") is None
    assert matcher.feed("p") == "stop"


def test_no_stop_sequences_matches_nothing():
    assert StopSequenceMatcher(()).feed("anything") is None

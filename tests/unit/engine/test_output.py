"""Incremental detokenisation, stop strings and streaming deltas, without a model."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budwood.engine import ChoiceDelta, FinishReason, RequestOutput, merge_outputs
from budwood.engine.output import IncrementalDetokenizer


class ByteTokenizer:
    """Token id = one byte: decoding part of a multi-byte character gives U+FFFD, as real tokenizers do."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(detok, prompt: list[int], text: str) -> tuple[list[int], list[bool]]:
    """Add `text` byte by byte; the token ids and, per token, whether a stop string ended it."""
    ids, stopped = list(prompt), []
    for b in text.encode():
        ids.append(b)
        stopped.append(detok.add_token(ids))
        if stopped[-1]:
            break
    return ids[len(prompt):], stopped


def test_text_is_decoded_as_tokens_arrive_and_never_splits_a_character():
    detok = IncrementalDetokenizer(ByteTokenizer(), list(b"prompt"), stop=[])
    ids = list(b"prompt")
    for b, want in zip("café".encode(), ["c", "ca", "caf", "caf", "café"]):
        ids.append(b)
        assert detok.add_token(ids) is False
        assert detok.text == want
    assert detok.token_ends == [1, 2, 3, 3, 4]


def test_a_stop_string_across_tokens_cuts_the_text_before_it():
    detok = IncrementalDetokenizer(ByteTokenizer(), [1], stop=["lo w", "zzz"])
    out, stopped = feed(detok, [1], "hello world")
    assert stopped[-1] and not any(stopped[:-1])
    assert detok.text == "hel" and bytes(out) == b"hello w"


def test_the_earliest_stop_string_wins():
    detok = IncrementalDetokenizer(ByteTokenizer(), [1], stop=["b", "ab"])
    feed(detok, [1], "xxab")
    assert detok.text == "xx"


def test_deltas_hold_back_what_may_start_a_stop_string():
    detok = IncrementalDetokenizer(ByteTokenizer(), [1], stop=["world"])
    out, _ = feed(detok, [1], "hello wor")
    delta = detok.delta(0, out, [], None)
    assert delta.text == "hello " and delta.token_ids == list(b"hello ")  # "wor" may be the stop string
    assert detok.delta(0, out, [], None) is None  # nothing new
    more, _ = feed(detok, [1] + out, "ld!")
    out += more
    assert detok.text == "hello " and detok.delta(0, out, [], FinishReason.STOP) == ChoiceDelta(
        0, "", list(b"wor") + list(b"ld"), [], FinishReason.STOP)


def test_a_finished_choice_sends_its_last_delta_once():
    detok = IncrementalDetokenizer(ByteTokenizer(), [1], stop=[])
    out, _ = feed(detok, [1], "ok")
    detok.add_stop_token()
    last = detok.delta(0, out + [0], [], FinishReason.STOP)
    assert last.text == "ok" and last.token_ids == out + [0] and last.finish_reason == "stop"
    assert detok.delta(0, out + [0], [], FinishReason.STOP) is None


def test_merge_outputs_concatenates_each_choice():
    def out(deltas, finished, completion):
        return RequestOutput("r", [1, 2], deltas, finished, 2, completion)

    acc = merge_outputs(None, out([ChoiceDelta(1, "b", [5], [], None)], False, 1))
    acc = merge_outputs(acc, out([ChoiceDelta(0, "a", [4], [], FinishReason.LENGTH),
                                  ChoiceDelta(1, "c", [6], [], FinishReason.STOP)], True, 3))
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in acc.choices] == [
        (0, "a", [4], "length"), (1, "bc", [5, 6], "stop")]
    assert acc.finished and acc.completion_tokens == 3 and acc.prompt_tokens == 2


@pytest.mark.parametrize("reason, word", [(FinishReason.STOP, "stop"), (FinishReason.LENGTH, "length")])
def test_finish_reasons_are_openai_strings(reason, word):
    assert reason == word and json.dumps({"finish_reason": reason}) == f'{{"finish_reason": "{word}"}}'


def _held_back_reference(text: str, stop: list[str]) -> int:
    """The definition: the longest suffix of the text that is a proper prefix of a stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab c", max_size=30), stop=st.lists(st.text(alphabet="ab c", max_size=8), max_size=4))
def test_held_back_text_is_the_longest_suffix_that_starts_a_stop_string(text, stop):
    detok = IncrementalDetokenizer(ByteTokenizer(), [], stop=stop)
    detok.text = text
    assert detok._held_back() == _held_back_reference(text, stop)


"""TextStream: incremental detokenization that never splits a UTF-8 character and never leaks a stop string.

Token ids here are raw bytes (id = byte value), the hardest case: every multi-byte character spans tokens.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.actors.text_stream import TextStream


def detokenize(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def ids_of(text: str) -> list[int]:
    return list(text.encode())


def stream(text: str, sizes: list[int], stop=()) -> tuple[list[str], TextStream]:
    """Feed text's bytes in chunks of the given sizes (cycled); return the deltas and the stream."""
    ids, deltas, ts = ids_of(text), [], TextStream(detokenize, stop)
    i = 0
    while i < len(ids) and not ts.stopped:
        n = sizes[len(deltas) % len(sizes)]
        deltas.append(ts.push(ids[i : i + n]))
        i += n
    deltas.append(ts.flush())
    return deltas, ts


def test_multibyte_character_split_over_tokens_is_held_back():
    ts = TextStream(detokenize)
    euro = ids_of("€")  # 3 bytes
    assert ts.push(euro[:1]) == ""
    assert ts.push(euro[1:2]) == ""
    assert ts.push(euro[2:]) == "€"


def test_deltas_concatenate_to_the_full_text():
    text = "héllo wörld 你好 🙂!"
    deltas, _ = stream(text, [1, 2])
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_flush_emits_an_incomplete_tail_as_replacement():
    ts = TextStream(detokenize)
    assert ts.push(ids_of("a") + ids_of("€")[:2]) == "a"
    assert ts.flush() == "\ufffd"


def test_stop_string_is_cut_and_stops():
    deltas, ts = stream("hello STOP world", [3], stop=["STOP"])
    assert "".join(deltas) == "hello "
    assert ts.stopped


def test_partial_stop_string_is_held_back_then_released():
    ts = TextStream(detokenize, ["STOP"])
    assert ts.push(ids_of("ab ST")) == "ab "
    assert ts.push(ids_of("ART")) == "START"
    assert not ts.stopped


def test_earliest_of_several_stop_strings_wins():
    deltas, _ = stream("one two three", [20], stop=["three", "two"])
    assert "".join(deltas) == "one "


def test_text_property_is_everything_emitted():
    ts = TextStream(detokenize)
    ts.push(ids_of("ab"))
    ts.push(ids_of("c"))
    assert ts.text == "abc"


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_fuzz_any_chunking_reassembles_without_replacement_characters(text, sizes):
    deltas, _ = stream(text, sizes)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abé你 ", max_size=30),
    stop=st.text(alphabet="abé你 ", min_size=1, max_size=3),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
)
def test_fuzz_stop_string_never_leaks(text, stop, sizes):
    deltas, ts = stream(text, sizes, stop=[stop])
    out = "".join(deltas)
    if stop in text:
        assert ts.stopped
        assert out == text[: text.index(stop)]
    else:
        assert out == text


def test_work_is_linear_in_the_output():
    # the old TextStream decoded the whole output on every push: 2000 pushes decoded ~2M ids
    decoded = []

    def counting(ids: list[int]) -> str:
        decoded.append(len(ids))
        return detokenize(ids)

    ts = TextStream(counting, ["never"])
    text = "héllo wörld 你好 " * 150  # > 2000 bytes
    out = "".join(ts.push([i]) for i in ids_of(text)) + ts.flush()
    assert out == text
    assert sum(decoded) < 10 * len(ids_of(text))


def test_a_tokenizer_that_needs_left_context():
    # sentencepiece-like: a token's leading space is dropped at the start of a decode
    vocab = {1: "▁Hello", 2: "▁world", 3: "!"}

    def sp_decode(ids: list[int]) -> str:
        return "".join(vocab[i] for i in ids).replace("▁", " ").lstrip(" ")

    ts = TextStream(sp_decode)
    out = [ts.push([1]), ts.push([2]), ts.push([3]), ts.flush()]
    assert "".join(out) == "Hello world!"

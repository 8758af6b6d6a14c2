"""Tokenizer wrapper, streaming detokenizer and stop-string matcher, on SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmserve.tokenizer import (
    IncrementalDetokenizer,
    StopResult,
    StopStringMatcher,
    Tokenizer,
    TokenizerError,
)

TEXTS = [
    "Hello, world!",
    "I feel 🙂 today 🙂🙂",
    "日本語のテキスト",
    "café naïve résumé Ångström",
    "   leading spaces and trailing   ",
    "line one\nline two\n\n\tindented\n",
    "mixed 日本 🙂 é\n end",
]

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(smollm2_dir)


@pytest.fixture(scope="module")
def prompt_ids(tok: Tokenizer) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": "Say something."}])


def _copy_tokenizer_files(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


# ------------------------------------------------------------------------ Tokenizer


def test_encode_decode_round_trip(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids and all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text


def test_special_tokens(tok: Tokenizer) -> None:
    assert 2 in tok.eos_token_ids
    assert isinstance(tok.eos_token_ids, frozenset)
    assert tok.bos_token_id == 1
    assert tok.vocab_size == 49152
    ids = tok.encode("a<|im_end|>b", add_special_tokens=False)
    assert 2 in ids
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<|im_end|>b"


def test_convert_ids_to_tokens_is_readable(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["Hello", " world"]
    assert tok.convert_ids_to_tokens([2]) == ["<|im_end|>"]
    assert tok.convert_ids_to_tokens([]) == []


def test_chat_template_matches_transformers(tok: Tokenizer) -> None:
    hf = tok.hf_tokenizer
    expected = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    assert tok.apply_chat_template(CONVERSATION) == list(expected)
    text = tok.render_chat(CONVERSATION)
    assert text == hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    # the template's default system prompt is kept, and the generation prompt is last
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert not tok.render_chat(CONVERSATION, add_generation_prompt=False).endswith("assistant\n")


def test_malformed_messages_raise(tok: Tokenizer) -> None:
    for bad in ([], "hi", [{"content": "no role"}], [{"role": "user", "content": 3}], ["x"]):
        with pytest.raises(TokenizerError):
            tok.apply_chat_template(bad)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError):  # the template itself fails (no 'content')
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(TokenizerError, match="nope"):  # raise_exception() in a template
        tok.render_chat(CONVERSATION, chat_template="{{ raise_exception('nope') }}")


def test_model_without_chat_template_raises(smollm2_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer_files(smollm2_dir, tmp_path / "plain")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    plain = Tokenizer.from_folder(folder)
    assert not plain.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        plain.apply_chat_template(CONVERSATION)
    with pytest.raises(ValueError):  # TokenizerError is a ValueError for the transports
        plain.render_chat(CONVERSATION)


def test_generation_config_eos_ids_are_merged(smollm2_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer_files(smollm2_dir, tmp_path / "gencfg")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer.from_folder(folder).eos_token_ids == frozenset({0, 2})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.from_folder(folder).eos_token_ids == frozenset({2, 7})


def test_from_folder_missing_raises(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError):
        Tokenizer.from_folder(tmp_path / "does-not-exist")


# ------------------------------------------------------------------------ IncrementalDetokenizer


def _stream(
    tok: Tokenizer, prompt: list[int], output: list[int], skip: bool, python: bool = False
) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    if python:
        detok._stream = None  # exercise the pure-Python fallback path
    pieces = [detok.step(t) for t in output]
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("python", [False, True], ids=["decode_stream", "python"])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_equals_full_decode(
    tok: Tokenizer, prompt_ids: list[int], skip: bool, python: bool
) -> None:
    for text in TEXTS + ["Done.<|im_end|>"]:
        output = tok.encode(text, add_special_tokens=False)
        for prompt in (prompt_ids, [], tok.encode("He said", add_special_tokens=False)):
            pieces = _stream(tok, prompt, output, skip, python)
            assert "".join(pieces) == tok.decode(output, skip_special_tokens=skip), (text, prompt)
            assert not any("\ufffd" in p for p in pieces)


def test_multibyte_characters_come_out_whole(tok: Tokenizer, prompt_ids: list[int]) -> None:
    for char in ("🙂", "日本語"):
        output = tok.encode(char, add_special_tokens=False)
        pieces = _stream(tok, prompt_ids, output, skip=True)
        assert "".join(pieces) == char
        assert all(p == "" or p in char for p in pieces)
    emoji = tok.encode("🙂", add_special_tokens=False)
    assert len(emoji) > 1  # byte-level pieces, so the test above really splits a character
    assert _stream(tok, prompt_ids, emoji, skip=True)[0] == ""


def test_leading_space_after_prompt(tok: Tokenizer) -> None:
    prompt = tok.encode("The answer is", add_special_tokens=False)
    output = tok.encode(" forty two", add_special_tokens=False)
    assert "".join(_stream(tok, prompt, output, skip=True)) == " forty two"


def test_prompt_ending_mid_character_does_not_leak_prompt(tok: Tokenizer) -> None:
    emoji = tok.encode("Hi 🙂", add_special_tokens=False)
    prompt, output = emoji[:-1], emoji[-1:] + tok.encode(" ok", add_special_tokens=False)
    text = "".join(_stream(tok, prompt, output, skip=True))
    assert "Hi" not in text
    assert text.endswith(" ok")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    output=st.lists(st.integers(min_value=0, max_value=49151), min_size=1, max_size=16),
    skip=st.booleans(),
)
def test_incremental_property_random_ids(tok: Tokenizer, output: list[int], skip: bool) -> None:
    """Any ids: the stream is a prefix of the full decode, holding back only an unfinished
    character at the end; it is the whole decode when that does not end mid-character."""
    full = tok.decode(output, skip_special_tokens=skip)
    for python in (False, True):
        text = "".join(_stream(tok, [1, 9690, 198], output, skip, python))
        assert full.startswith(text)
        if full.endswith("\ufffd"):
            assert len(text) < len(full)
        else:
            assert text == full


# ------------------------------------------------------------------------ StopStringMatcher


def _feed_all(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, str | None]:
    out = []
    for chunk in chunks:
        res = matcher.feed(chunk)
        out.append(res.text_to_emit)
        if res.stop is not None:
            return "".join(out), res.stop
    out.append(matcher.flush())
    return "".join(out), None


def test_stop_across_token_boundaries() -> None:
    m = StopStringMatcher(["lo W"])
    assert m.feed("Hel") == StopResult("He", None)  # "l" could start "lo W"
    assert m.feed("lo W") == StopResult("l", "lo W")
    assert m.stopped == "lo W"
    assert m.feed("orld") == StopResult("", "lo W")  # done: nothing more
    assert m.flush() == ""


def test_hold_back_then_release() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == StopResult("abc ", None)
    assert m.feed("O") == StopResult("", None)  # "STO" still held
    assert m.feed("P?") == StopResult("", "STOP")
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == StopResult("abc ", None)
    assert m.feed("OX") == StopResult("STOX", None)  # cannot be STOP any more
    assert m.feed("") == StopResult("", None)


def test_hold_back_is_bounded() -> None:
    m = StopStringMatcher(["abcabc"])
    res = m.feed("xxabcab")
    assert res == StopResult("xx", None)  # held "abcab": 5 = len(stop) - 1
    assert m.feed("d") == StopResult("abcabd", None)


def test_earliest_match_wins() -> None:
    m = StopStringMatcher(["world", "lo"])
    assert m.feed("Hello world") == StopResult("Hel", "lo")
    m = StopStringMatcher(["b", "cd"])
    assert m.feed("a cd b") == StopResult("a ", "cd")
    # the same answer whatever the chunking
    assert _feed_all(StopStringMatcher(["b", "cd"]), ["a c", "d", " b"]) == ("a ", "cd")


def test_include_stop_str_in_output() -> None:
    m = StopStringMatcher(["lo W"], include_stop_str_in_output=True)
    assert m.feed("Hel") == StopResult("He", None)
    assert m.feed("lo World") == StopResult("llo W", "lo W")


def test_flush_releases_held_text() -> None:
    m = StopStringMatcher(["</answer>"])
    assert m.feed("42 </ans") == StopResult("42 ", None)
    assert m.flush() == "</ans"
    assert m.flush() == ""


def test_no_stops_passes_through() -> None:
    m = StopStringMatcher([])
    assert m.feed("anything") == StopResult("anything", None)
    assert m.flush() == ""
    assert StopStringMatcher([""]).feed("x") == StopResult("x", None)  # "" is not a stop


def _reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Character-by-character definition: the first stop to complete wins (longest on ties)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=6),
    include=st.booleans(),
)
def test_stop_matcher_property(text: str, stops: list[str], cuts: list[int], include: bool) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    got = _feed_all(StopStringMatcher(stops, include_stop_str_in_output=include), chunks)
    assert got == _reference_stop(text, stops, include)


def test_stream_failure_falls_back_mid_sequence(tok: Tokenizer, prompt_ids: list[int]) -> None:
    """If the Rust stream rejects a step, the Python path continues with no lost text."""

    class Flaky:
        def __init__(self, real, fail_at: int) -> None:
            self.real, self.calls, self.fail_at = real, 0, fail_at

        def step(self, backend, token_id):
            self.calls += 1
            if self.calls == self.fail_at:
                raise Exception("Invalid prefix encountered")
            return self.real.step(backend, token_id)

    text = "mixed 日本 🙂 é\n end"
    output = tok.encode(text, add_special_tokens=False)
    for fail_at in range(1, len(output) + 1):
        detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=True)
        detok._stream = Flaky(detok._stream, fail_at)
        assert "".join(detok.step(t) for t in output) == text
        assert detok._stream is None

"""The streaming output guard: text split anywhere comes out exactly as the whole text would, no character
of a redacted span is ever released, text is held back only while a match may be forming, and a block
ends the stream."""

from __future__ import annotations

import hashlib
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.safety import GuardStep, SafetyFilter
from lmserve.safety.policy import parse_policy
from lmserve.safety.toxicity import ToxicityModel
from tests.safety.labelled_set import RSA_KEY

SECRET_TEXTS = {
    "Mail jane.doe@gmail.com or call (415) 555-2671 today.": "Mail [EMAIL] or call [PHONE] today.",
    "key=AKIAQ3EGRX7Z4NV2KLPM and card 4111 1111 1111 1111, not 4111 1111 1111 1112.": (
        "key=[SECRET] and card [CARD], not 4111 1111 1111 1112."
    ),
    'password = "Tr0ub4dor&3x"\nIBAN GB82 WEST 1234 5698 7654 32 IS MINE': 'password = "[SECRET]"\nIBAN [IBAN] IS MINE',
    "Here:\n" + RSA_KEY + "\nok, sk-proj-Abc123Def456Ghi789Jkl012Mno.": "Here:\n[SECRET]\nok, [SECRET].",
    "ip 81.2.69.142 vs 192.168.1.1, ssn 536-22-4415, pass\u200bword.": "ip [IP] vs 192.168.1.1, ssn [SSN], password.",
    "DATABASE_URL=postgres://admin:s3cr3tPa55@db.internal:5432/app": "DATABASE_URL=postgres://admin:[SECRET]@db.internal:5432/app",
}
# The spans each text must never leak, not even one character at their place.
SECRETS = (
    "jane.doe@gmail.com", "(415) 555-2671", "AKIAQ3EGRX7Z4NV2KLPM", "4111 1111 1111 1111", "Tr0ub4dor&3x",
    "GB82 WEST 1234 5698 7654 32", RSA_KEY, "sk-proj-Abc123Def456Ghi789Jkl012Mno", "81.2.69.142", "536-22-4415",
    "s3cr3tPa55",
)


def stream(safety: SafetyFilter, chunks: list[str]) -> tuple[list[str], GuardStep | None]:
    """Feed `chunks`, then finish; returns the cumulative released text after every step, and the blocking
    step if one blocked."""
    guard = safety.output_guard()
    released = ""
    history: list[str] = []
    for chunk in chunks:
        step = guard.feed(chunk)
        if step.blocked is not None:
            return history, step
        released += step.text
        history.append(released)
    step = guard.finish()
    if step.blocked is not None:
        return history, step
    history.append(released + step.text)
    return history, None


def assert_streams_exactly(safety: SafetyFilter, chunks: list[str], expected: str) -> None:
    history, blocked = stream(safety, chunks)
    assert blocked is None
    for released in history:
        assert expected.startswith(released), (chunks, released)  # never a character that is not final
    assert history[-1] == expected, chunks


@pytest.fixture(params=["default", "spans_only"])
def safety(request: pytest.FixtureRequest) -> SafetyFilter:
    return request.getfixturevalue(f"{request.param}_filter")


@pytest.mark.parametrize("text", SECRET_TEXTS)
def test_whole_text_redaction(safety: SafetyFilter, text: str) -> None:
    assert safety.check_output(text).text == SECRET_TEXTS[text]


@pytest.mark.parametrize("text", SECRET_TEXTS)
def test_every_two_way_split(safety: SafetyFilter, text: str) -> None:
    expected = SECRET_TEXTS[text]
    for i in range(len(text) + 1):
        assert_streams_exactly(safety, [text[:i], text[i:]], expected)


@pytest.mark.parametrize("text", SECRET_TEXTS)
def test_one_character_at_a_time(safety: SafetyFilter, text: str) -> None:
    assert_streams_exactly(safety, list(text), SECRET_TEXTS[text])


@pytest.mark.parametrize("text", SECRET_TEXTS)
def test_random_token_sized_chunks(safety: SafetyFilter, text: str) -> None:
    rng = random.Random(text)
    for _ in range(30):
        chunks, pos = [], 0
        while pos < len(text):
            size = rng.randint(1, 6)
            chunks.append(text[pos : pos + size])
            pos += size
        assert_streams_exactly(safety, chunks, SECRET_TEXTS[text])


def test_expected_texts_hold_no_secret() -> None:
    for expected in SECRET_TEXTS.values():
        for secret in SECRETS:
            assert secret not in expected
            # and no prefix of it where it stood: only placeholders there
        assert "[" in expected


def test_released_never_shows_a_secret_s_first_character_at_its_place(spans_only_filter: SafetyFilter) -> None:
    text = "token ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5 end"
    start = text.index("ghp_")
    history, blocked = stream(spans_only_filter, list(text))
    assert blocked is None
    for released in history:
        assert released[start : start + 1] in ("", "[")
    assert history[-1] == "token [SECRET] end"


# -- hold-back: only as long as a match can still be forming ------------------------------------------------------


def test_plain_text_is_held_only_for_its_last_word(spans_only_filter: SafetyFilter) -> None:
    guard = spans_only_filter.output_guard()
    assert guard.feed("The answer is forty two and").text == "The answer is forty two "
    assert guard.feed(" more").text == "and "
    assert guard.finish().text == "more"


def test_a_number_is_held_until_it_is_known(spans_only_filter: SafetyFilter) -> None:
    guard = spans_only_filter.output_guard()
    assert guard.feed("Call me at 415").text == "Call me at "
    assert guard.feed(" 555").text == ""
    assert guard.feed(" 2671 today").text == "[PHONE] "
    assert guard.feed(", in room 1204 please.").text == "today, in room 1204 "
    assert guard.finish().text == "please."


def test_a_private_key_block_is_held_from_begin_to_end(spans_only_filter: SafetyFilter) -> None:
    lines = RSA_KEY.split("\n")
    guard = spans_only_filter.output_guard()
    assert guard.feed("key:\n" + lines[0] + "\n").text == "key:\n"
    for line in lines[1:-1]:
        assert guard.feed(line + "\n").text == ""
    assert guard.feed(lines[-1] + "\nbye now").text == "[SECRET]\nbye "
    assert guard.finish().text == "now"


def test_a_cut_off_private_key_is_redacted_at_the_end(spans_only_filter: SafetyFilter) -> None:
    cut = RSA_KEY[:120]
    history, blocked = stream(spans_only_filter, ["x ", cut])
    assert blocked is None and history[-1] == "x [SECRET]"


def test_sentences_are_held_for_the_classifier_under_hold(hold_filter: SafetyFilter) -> None:
    guard = hold_filter.output_guard()
    assert guard.feed("Hello there. How").text == "Hello there. "
    assert guard.feed(" are you").text == ""
    assert guard.feed("? Fine").text == "How are you? "
    assert guard.finish().text == "Fine"


def test_words_are_released_as_they_complete_under_word(default_filter: SafetyFilter) -> None:
    guard = default_filter.output_guard()
    assert guard.feed("Hello there. How").text == "Hello there. "
    assert guard.feed(" are you").text == "How are "
    assert guard.feed("? Fine").text == "you? "
    assert guard.finish().text == "Fine"


def test_a_crossing_is_held_until_the_next_words_undo_it(default_filter: SafetyFilter) -> None:
    # "Dick" alone scores 1.0; inside the name it is masked, and the held word goes out with the next one.
    guard = default_filter.output_guard()
    assert guard.feed("Yes, Dick").text == "Yes, "
    assert guard.feed(" Van").text == ""  # "Dick" crossed: held
    assert guard.feed(" Dyke starred").text == "Dick Van Dyke "
    assert guard.finish().text == "starred"
    # A word whose running score crosses and then falls back within the sentence.
    history, blocked = stream(default_filter, ["He", " will", " die", " of", " old", " age", " one", " day", "."])
    assert blocked is None
    assert history[2:6] == ["He will "] * 4  # "die" crossed at its boundary; "of old" kept it above
    assert history[6] == "He will die of old age "
    assert history[-1] == "He will die of old age one day."


def test_toxic_output_blocks_at_its_sentence_end(default_filter: SafetyFilter) -> None:
    guard = default_filter.output_guard()
    assert guard.feed("Sure thing. ").text == "Sure thing. "
    step = guard.feed("You are a fuck")
    assert step.text == "You are a " and step.blocked is None
    step = guard.feed("ing idiot. And")
    assert step.text == ""
    assert step.blocked is not None
    assert (step.blocked.direction, step.blocked.category, step.blocked.action) == ("output", "toxicity", "block")
    assert step.decisions == [step.blocked]
    assert guard.is_done
    with pytest.raises(RuntimeError):
        guard.feed("more")
    with pytest.raises(RuntimeError):
        guard.finish()


@pytest.mark.parametrize("chunking", ["characters", "tokens", "words"])
def test_no_word_from_the_crossing_on_is_released_before_a_block(
    default_filter: SafetyFilter, toxicity_model: ToxicityModel, chunking: str
) -> None:
    sentence = "Honestly, you are a worthless idiot and a total loser. "
    text = "Thanks for the question. " + sentence + "Bye."
    # The word where the sentence's running score first crosses the threshold: "idiot".
    ends = [m.end() for m in re.finditer(r"\w+", sentence)]
    crossing_end = next(end for end in ends if toxicity_model.score(sentence[:end]) >= 0.9)
    crossing = text.index(sentence) + sentence.rindex(" ", 0, crossing_end) + 1
    assert text[crossing:].startswith("idiot")
    if chunking == "characters":
        chunks = list(text)
    elif chunking == "tokens":
        chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
    else:
        chunks = [piece + " " for piece in text.split(" ")]
    history, blocked = stream(default_filter, chunks)
    assert blocked is not None and blocked.blocked is not None
    assert (blocked.blocked.category, blocked.blocked.action) == ("toxicity", "block")
    for released in history:
        assert text.startswith(released)
        assert len(released) <= crossing  # nothing of the crossing word or after it
    # Everything before the crossing word went out before the block, however the text came.
    assert history[-1] == text[:crossing]


# -- decisions --------------------------------------------------------------------------------------------------


def test_one_decision_per_category_and_action_with_the_hash_of_the_output_so_far(
    spans_only_filter: SafetyFilter,
) -> None:
    guard = spans_only_filter.output_guard()
    first = guard.feed("a jo@acme.io b ")
    assert [(d.category, d.action, d.kinds) for d in first.decisions] == [("pii", "redact", ("email",))]
    assert first.decisions[0].text_sha256 == hashlib.sha256(b"a jo@acme.io b ").hexdigest()
    assert guard.feed("x@acme.io (415) 555-2671 ").decisions == []  # pii/redact already decided
    last = guard.feed("pass\u200bword ")
    assert [(d.category, d.action, d.kinds) for d in last.decisions] == [("unicode", "strip", ("invisible",))]


def test_streamed_and_whole_decisions_agree(default_filter: SafetyFilter) -> None:
    text = "Mail jane.doe@gmail.com, key AKIAQ3EGRX7Z4NV2KLPM, p\u0430ypal and pass\u200bword."
    whole = {(d.category, d.action) for d in default_filter.check_output(text).decisions}
    guard = default_filter.output_guard()
    streamed = {(d.category, d.action) for ch in text for d in guard.feed(ch).decisions}
    streamed |= {(d.category, d.action) for d in guard.finish().decisions}
    assert whole == streamed == {("pii", "redact"), ("secrets", "redact"), ("unicode", "flag"), ("unicode", "strip")}


# -- any text, any split -----------------------------------------------------------------------------------------

FRAGMENTS = [
    "Hello", " ", "world", ". ", "\n", ", ", "jo.doe@acme.io", "AKIAQ3EGRX7Z4NV2KLPM", "(415) 555-2671",
    "4111 1111 1111 1111", "4111 1111 1111 1112", "pass\u200bword", 'password = "Tr0ub4dor&3x"', "192.168.1.1",
    "8.8.8.8", "GB82 WEST 1234 5698 7654 32", RSA_KEY, RSA_KEY[:60], "sk-proj-Abc123Def456Ghi789Jkl012Mno",
    "12", "3", "@", ":", "-", ".", "p\u0430ypal", "kill -9 ", "Bearer ", "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "536-22-4415", "2a00:1450:4009:81f::200e", "\u200d", "\U0001f468", "a\u0301",
]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    pieces=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_any_split_of_any_text_streams_as_the_whole(
    spans_only_filter: SafetyFilter, default_filter: SafetyFilter, hold_filter: SafetyFilter,
    pieces: list[str], cuts: list[int],
) -> None:
    text = "".join(pieces)
    points = sorted({c % (len(text) + 1) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    for safety in (spans_only_filter, default_filter, hold_filter):
        whole = safety.check_output(text)
        if whole.blocked is not None:
            continue
        assert_streams_exactly(safety, chunks, whole.text)


# Words the classifier reads as abuse, benign in context or not, for the sentence classifiers' hold-back.
TOXIC_FRAGMENTS = [
    "Hello", " ", "world", ". ", "\n", ", ", "Dick", " Van Dyke", "Moby", " dick", "He will die", " of old age",
    "kill", " the process", "kill -9 ", "idiot", "you", " are a", " fucking", "hell", "'s Kitchen", "breast",
    " cancer screening", "Sussex", "?", "!", "jo.doe@acme.io", "sex", " of the fish", "I hate", " Mondays", "x" * 30,
]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    pieces=st.lists(st.sampled_from(TOXIC_FRAGMENTS), min_size=1, max_size=14),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_any_split_decides_as_the_whole_under_both_stream_modes(
    default_filter: SafetyFilter, hold_filter: SafetyFilter, pieces: list[str], cuts: list[int]
) -> None:
    text = "".join(pieces)
    points = sorted({c % (len(text) + 1) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    wholes = [safety.check_output(text) for safety in (default_filter, hold_filter)]
    # The two modes decide alike; they differ only in what a stream holds meanwhile.
    assert (wholes[0].blocked is None) == (wholes[1].blocked is None)
    if wholes[0].blocked is None:
        assert wholes[0].text == wholes[1].text
    for safety, whole in zip((default_filter, hold_filter), wholes, strict=True):
        if whole.blocked is None:
            assert_streams_exactly(safety, chunks, whole.text)
            continue
        history, blocked = stream(safety, chunks)
        assert blocked is not None and blocked.blocked is not None
        assert blocked.blocked.category == whole.blocked.category
        finest, _ = stream(safety, list(text))  # one character at a time releases the most
        for released in history:
            assert finest[-1].startswith(released)

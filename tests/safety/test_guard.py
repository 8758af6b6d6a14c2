"""The streaming output guard: text split anywhere comes out exactly as the whole text would, no character
of a redacted span is ever released, text is held back only while a match may be forming, and a block
ends the stream."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.safety import GuardStep, SafetyFilter
from service.safety.policy import parse_policy
from service.safety.toxicity import ToxicityModel
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


def test_sentences_are_held_for_the_classifier(default_filter: SafetyFilter) -> None:
    guard = default_filter.output_guard()
    assert guard.feed("Hello there. How").text == "Hello there. "
    assert guard.feed(" are you").text == ""
    assert guard.feed("? Fine").text == "How are you? "
    assert guard.finish().text == "Fine"


# -- blocking ----------------------------------------------------------------------------------------------------


def test_toxic_output_blocks_at_its_sentence_end(default_filter: SafetyFilter) -> None:
    guard = default_filter.output_guard()
    assert guard.feed("Sure thing. ").text == "Sure thing. "
    step = guard.feed("You are a fuck")
    assert step.text == "" and step.blocked is None
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


def test_figurative_output_is_released(default_filter: SafetyFilter) -> None:
    history, blocked = stream(default_filter, ["That's a kil", "ler recipe, and kill -", "9 stops it."])
    assert blocked is None and history[-1] == "That's a killer recipe, and kill -9 stops it."


def test_block_list_blocks_output(eval_filter: SafetyFilter) -> None:
    history, blocked = stream(eval_filter, ["All good. ", "Project Night", "ingale launches Monday."])
    assert blocked is not None and blocked.blocked is not None
    assert blocked.blocked.category == "blocklist"
    assert history[-1] == "All good. "  # nothing of the term or its sentence went out


def test_output_secret_blocks_when_the_policy_says_so(toxicity_model: ToxicityModel) -> None:
    safety = SafetyFilter(parse_policy("categories:\n  secrets: {output: block}\n"), toxicity_model)
    history, blocked = stream(safety, ["ok ", "AKIAQ3EGRX7Z", "4NV2KLPM and more"])
    assert blocked is not None and blocked.blocked is not None and blocked.blocked.category == "secrets"
    assert all("AKIA" not in released for released in history)


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
    spans_only_filter: SafetyFilter, default_filter: SafetyFilter, pieces: list[str], cuts: list[int]
) -> None:
    text = "".join(pieces)
    points = sorted({c % (len(text) + 1) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    for safety in (spans_only_filter, default_filter):
        whole = safety.check_output(text)
        if whole.blocked is not None:
            continue
        assert_streams_exactly(safety, chunks, whole.text)

"""Policy files: the packaged default, custom files, and one-line errors for every kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.safety.policy import (
    ALLOWED_ACTIONS,
    CATEGORIES,
    PII_KINDS,
    PolicyError,
    load_policy,
    parse_policy,
)


def test_default_policy_is_the_issue_s_defaults() -> None:
    policy = load_policy(None)
    assert policy.source == "default"
    actions = {name: (policy.action(name, "input"), policy.action(name, "output")) for name in CATEGORIES}
    assert actions == {
        "injection": ("block", "off"),
        "secrets": ("block", "redact"),
        "pii": ("flag", "redact"),
        "toxicity": ("flag", "block"),
        "unicode": ("strip", "strip"),
        "blocklist": ("block", "block"),
    }
    assert policy.pii_kinds == PII_KINDS
    assert policy.phone_regions == ("US", "GB")
    assert policy.threshold("toxicity") == 0.9
    assert policy.block_terms == () and policy.block_patterns == ()


def test_default_policy_ships_as_package_data() -> None:
    import lmserve.safety

    assert (Path(lmserve.safety.__file__).parent / "default_policy.yaml").is_file()
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"lmserve.safety" = ["default_policy.yaml"]' in pyproject


def test_custom_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        """
version: 1
categories:
  pii: {input: redact, output: off, threshold: 0.7, kinds: [email, card], phone_regions: [DE]}
  blocklist: {output: redact, terms: ["project nightingale"], patterns: ['\\bINC-\\d{6}\\b']}
"""
    )
    policy = load_policy(path)
    assert policy.source == str(path)
    assert policy.action("pii", "input") == "redact"
    assert policy.action("pii", "output") == "off"  # bare `off` is YAML's false
    assert policy.threshold("pii") == 0.7
    assert policy.pii_kinds == ("email", "card")
    assert policy.phone_regions == ("DE",)
    assert policy.action("blocklist", "input") == "off"  # a left-out direction
    assert policy.action("injection", "input") == "off"  # a left-out category
    assert policy.block_terms == ("project nightingale",)
    assert policy.block_patterns == (r"\bINC-\d{6}\b",)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("categories:\n  violence: {input: block}\n", "categories.violence: unknown category"),
        ("categories:\n  pii: {input: delete}\n", "categories.pii.input: bad action 'delete' (one of: block, redact, flag, off)"),
        ("categories:\n  injection: {input: redact}\n", "categories.injection.input: bad action 'redact'"),
        ("categories:\n  secrets: {output: strip}\n", "categories.secrets.output: bad action 'strip'"),
        ("categories:\n  unicode: {input: yes}\n", "categories.unicode.input: bad action True"),
        ("categories:\n  toxicity: {threshold: 1.5}\n", "categories.toxicity.threshold: bad threshold 1.5 (a number from 0 to 1)"),
        ("categories:\n  toxicity: {threshold: high}\n", "categories.toxicity.threshold: bad threshold 'high'"),
        ("categories:\n  toxicity: {threshold: true}\n", "categories.toxicity.threshold: bad threshold True"),
        ("categories:\n  pii: {inptu: flag}\n", "categories.pii.inptu: unknown key"),
        ("categories:\n  pii: {kinds: [email, passport]}\n", "categories.pii.kinds: unknown kind 'passport'"),
        ("categories:\n  pii: {phone_regions: [XX]}\n", "categories.pii.phone_regions: unknown region 'XX'"),
        ("categories:\n  blocklist: {patterns: ['(unclosed']}\n", "categories.blocklist.patterns: bad regular expression '(unclosed'"),
        ("categories:\n  blocklist: {patterns: ['a*']}\n", "categories.blocklist.patterns: pattern 'a*' matches the empty string"),
        ("categories:\n  blocklist: {terms: ['  ']}\n", "categories.blocklist.terms: a term is empty"),
        ("categories:\n  blocklist: {terms: nightingale}\n", "categories.blocklist.terms: must be a list of strings"),
        ("version: 2\n", "version: unsupported version 2 (expected 1)"),
        ("scanners: {}\n", "scanners: unknown key (expected: version, categories)"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("categories: [pii]\n", "categories: must be a mapping"),
        ("categories:\n  pii: block\n", "categories.pii: must be a mapping"),
        ("categories:\n  pii: {input: flag\n", "invalid YAML at line"),
    ],
)
def test_bad_policy_is_one_clear_line(document: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(document, "p.yaml")
    text = str(info.value)
    assert text.startswith("safety policy p.yaml: ")
    assert message in text
    assert "\n" not in text


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^safety policy .*nope\.yaml: cannot read: No such file or directory$"):
        load_policy(tmp_path / "nope.yaml")


def test_every_category_allows_off_and_block() -> None:
    for name in CATEGORIES:
        assert "off" in ALLOWED_ACTIONS[name] and "block" in ALLOWED_ACTIONS[name]


def test_stream_mode_per_classifier_defaults_to_word() -> None:
    policy = load_policy(None)
    assert policy.stream_mode("toxicity") == "word" and policy.stream_mode("injection") == "word"
    custom = parse_policy("categories:\n  toxicity: {output: block, stream: hold}\n  injection: {output: flag}\n")
    assert custom.stream_mode("toxicity") == "hold"
    assert custom.stream_mode("injection") == "word"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("categories:\n  toxicity: {stream: sentence}\n", "categories.toxicity.stream: bad stream mode 'sentence' (one of: word, hold)"),
        ("categories:\n  pii: {stream: word}\n", "categories.pii.stream: unknown key"),
    ],
)
def test_stream_mode_errors(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as excinfo:
        parse_policy(text, "p.yaml")
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)

"""The safety policy: one YAML file, loaded and validated once at startup.

    version: 1
    categories:
      injection: {input: block, output: off, threshold: 0.5}
      secrets:   {input: block, output: redact}
      pii:       {input: flag, output: redact, kinds: [email, phone], phone_regions: [US, GB]}
      toxicity:  {input: flag, output: block, threshold: 0.9, stream: word}
      unicode:   {input: strip, output: strip}
      blocklist: {input: block, output: block, terms: ["project nightingale"], patterns: ['\\bINC-\\d{6}\\b']}

A category left out, or a direction left out of a category, is `off` there. `stream` (the sentence
classifiers, injection and toxicity, on output) says how much streamed text a classifier holds back:
`word` (the default) judges the sentence so far at every word boundary and holds only the word being
written (a few words while a crossing of the threshold is pending); `hold` judges whole sentences and
holds each until it ends. Every problem is a
`PolicyError` whose message is one line naming the file and the key, for the CLI's `error: ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import phonenumbers
import regex
import yaml

CATEGORIES = ("injection", "secrets", "pii", "toxicity", "unicode", "blocklist")
DIRECTIONS = ("input", "output")
PII_KINDS = ("email", "phone", "card", "iban", "ssn", "ip")
# What each category can do. `strip` removes invisible characters (only unicode can); `redact`
# replaces a span with a typed placeholder (needs a span, so not the sentence classifiers).
ALLOWED_ACTIONS: dict[str, tuple[str, ...]] = {
    "injection": ("block", "flag", "off"),
    "secrets": ("block", "redact", "flag", "off"),
    "pii": ("block", "redact", "flag", "off"),
    "toxicity": ("block", "flag", "off"),
    "unicode": ("block", "strip", "flag", "off"),
    "blocklist": ("block", "redact", "flag", "off"),
}
DEFAULT_THRESHOLDS = {
    "injection": 0.5,
    "secrets": 0.5,
    "pii": 0.5,
    "toxicity": 0.9,
    "unicode": 0.5,
    "blocklist": 0.5,
}
DEFAULT_PHONE_REGIONS = ("US", "GB")
# How a sentence classifier reads a stream (see the module docstring); only these categories have one.
STREAM_MODES = ("word", "hold")
CLASSIFIER_CATEGORIES = ("injection", "toxicity")
DEFAULT_STREAM_MODE = "word"
_CATEGORY_KEYS = {"input", "output", "threshold"}
_EXTRA_KEYS = {
    "pii": {"kinds", "phone_regions"},
    "blocklist": {"terms", "patterns"},
    "injection": {"stream"},
    "toxicity": {"stream"},
}
DEFAULT_POLICY_NAME = "default_policy.yaml"


class PolicyError(ValueError):
    """A policy file that cannot be used; the message is one line."""


@dataclass(frozen=True)
class CategoryPolicy:
    input: str  # an action from ALLOWED_ACTIONS[category]
    output: str
    threshold: float  # a finding counts when its score is at least this (0..1)
    stream: str = DEFAULT_STREAM_MODE  # word | hold: the sentence classifiers' hold-back on streamed output

    def action(self, direction: str) -> str:
        return self.input if direction == "input" else self.output


@dataclass(frozen=True)
class Policy:
    categories: dict[str, CategoryPolicy]  # every name in CATEGORIES
    pii_kinds: tuple[str, ...] = PII_KINDS
    phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS  # where numbers without +country are parsed
    block_terms: tuple[str, ...] = ()
    block_patterns: tuple[str, ...] = ()
    source: str = "default"

    def action(self, category: str, direction: str) -> str:
        return self.categories[category].action(direction)

    def threshold(self, category: str) -> float:
        return self.categories[category].threshold

    def stream_mode(self, category: str) -> str:
        return self.categories[category].stream

    def summary(self) -> str:
        """One line for the log: where the policy came from and each category's input/output action."""
        origin = "the packaged default" if self.source == "default" else self.source
        actions = ", ".join(f"{name} {c.input}/{c.output}" for name, c in self.categories.items())
        held = [name for name, c in self.categories.items() if name in CLASSIFIER_CATEGORIES and c.stream == "hold"]
        streaming = f"; streamed output held by the sentence for {', '.join(held)}" if held else ""
        return f"policy {origin}; input/output: {actions}{streaming}"


def default_policy_text() -> str:
    return resources.files("lmserve.safety").joinpath(DEFAULT_POLICY_NAME).read_text(encoding="utf-8")


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy in `path`, or the packaged default for None. Raises PolicyError."""
    if path is None:
        return parse_policy(default_policy_text(), "default")
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"safety policy {source}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"safety policy {source}: not UTF-8 text") from exc
    return parse_policy(text, source)


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Validate a policy document (YAML text). Raises PolicyError."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"safety policy {source}: invalid YAML{_yaml_where(exc)}") from exc
    return _Validator(source).policy(doc)


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return where + (f": {problem}" if problem else "")


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, problem: str) -> PolicyError:
        return PolicyError(f"safety policy {self.source}: {key}: {problem}")

    def policy(self, doc: Any) -> Policy:
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise PolicyError(f"safety policy {self.source}: the top level must be a mapping")
        unknown = set(doc) - {"version", "categories"}
        if unknown:
            raise self.error(_first(unknown), "unknown key (expected: version, categories)")
        if doc.get("version", 1) != 1:
            raise self.error("version", f"unsupported version {doc['version']!r} (expected 1)")
        cats = doc.get("categories") or {}
        if not isinstance(cats, dict):
            raise self.error("categories", "must be a mapping of category name to settings")
        for name in cats:
            if name not in CATEGORIES:
                raise self.error(f"categories.{name}", f"unknown category (expected one of: {', '.join(CATEGORIES)})")
        categories = {name: self.category(name, cats.get(name)) for name in CATEGORIES}
        pii = cats.get("pii") or {}
        blocklist = cats.get("blocklist") or {}
        return Policy(
            categories=categories,
            pii_kinds=self.pii_kinds(pii.get("kinds", list(PII_KINDS))),
            phone_regions=self.phone_regions(pii.get("phone_regions", list(DEFAULT_PHONE_REGIONS))),
            block_terms=self.terms(blocklist.get("terms", [])),
            block_patterns=self.patterns(blocklist.get("patterns", [])),
            source=self.source,
        )

    def category(self, name: str, settings: Any) -> CategoryPolicy:
        key = f"categories.{name}"
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise self.error(key, "must be a mapping with input, output and threshold")
        allowed_keys = _CATEGORY_KEYS | _EXTRA_KEYS.get(name, set())
        unknown = set(settings) - allowed_keys
        if unknown:
            raise self.error(f"{key}.{_first(unknown)}", f"unknown key (expected: {', '.join(sorted(allowed_keys))})")
        actions = [self.action(name, f"{key}.{d}", settings.get(d, "off")) for d in DIRECTIONS]
        threshold = self.threshold(f"{key}.threshold", settings.get("threshold", DEFAULT_THRESHOLDS[name]))
        stream = settings.get("stream", DEFAULT_STREAM_MODE)
        if stream not in STREAM_MODES:
            raise self.error(f"{key}.stream", f"bad stream mode {stream!r} (one of: {', '.join(STREAM_MODES)})")
        return CategoryPolicy(actions[0], actions[1], threshold, stream)

    def action(self, category: str, key: str, value: Any) -> str:
        # YAML 1.1 reads a bare `off` as false; accept it as the word the file means.
        if value is False:
            value = "off"
        allowed = ALLOWED_ACTIONS[category]
        if not isinstance(value, str) or value not in allowed:
            raise self.error(key, f"bad action {value!r} (one of: {', '.join(allowed)})")
        return value

    def threshold(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise self.error(key, f"bad threshold {value!r} (a number from 0 to 1)")
        return float(value)

    def string_list(self, key: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "must be a list of strings")
        return value

    def pii_kinds(self, value: Any) -> tuple[str, ...]:
        kinds = self.string_list("categories.pii.kinds", value)
        for kind in kinds:
            if kind not in PII_KINDS:
                raise self.error("categories.pii.kinds", f"unknown kind {kind!r} (one of: {', '.join(PII_KINDS)})")
        return tuple(dict.fromkeys(kinds))

    def phone_regions(self, value: Any) -> tuple[str, ...]:
        regions = self.string_list("categories.pii.phone_regions", value)
        for region in regions:
            if region not in phonenumbers.SUPPORTED_REGIONS:
                raise self.error(
                    "categories.pii.phone_regions", f"unknown region {region!r} (two-letter codes such as US, GB, DE)"
                )
        return tuple(dict.fromkeys(regions))

    def terms(self, value: Any) -> tuple[str, ...]:
        terms = self.string_list("categories.blocklist.terms", value)
        for term in terms:
            if not term.strip():
                raise self.error("categories.blocklist.terms", "a term is empty")
        return tuple(terms)

    def patterns(self, value: Any) -> tuple[str, ...]:
        key = "categories.blocklist.patterns"
        patterns = self.string_list(key, value)
        for pattern in patterns:
            try:
                compiled = regex.compile(pattern)
            except regex.error as exc:
                raise self.error(key, f"bad regular expression {pattern!r}: {exc}") from exc
            if compiled.fullmatch(""):
                raise self.error(key, f"pattern {pattern!r} matches the empty string")
        return tuple(patterns)


def _first(keys: set[Any]) -> str:
    return str(sorted(map(str, keys))[0])

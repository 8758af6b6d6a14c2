"""Secrets: credentials with a known shape (cloud and API keys, tokens, private key blocks) and values
assigned to a secret-sounding name (`password = "..."`) whose entropy says they are not placeholders.

Every finding is redacted as [SECRET]. A key-shaped value scores 1; an assigned value scores its
information content, len x Shannon entropy per character, over 64 bits (so 32 bits scores 0.5).
"""

from __future__ import annotations

import math
from collections import Counter

import regex

from lmserve.safety.spans import Finding, SpanPattern

CATEGORY = "secrets"
PLACEHOLDER = "[SECRET]"
_FULL_BITS = 64.0

# name -> (pattern, anchor); each match is wholly secret. The anchor is a literal every match contains
# (see spans.py).
KNOWN_FORMATS: dict[str, tuple[str, str]] = {
    "aws_access_key": (
        r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA|AIPA|ANPA|ANVA)[0-9A-Z]{16}(?![A-Za-z0-9])",
        r"A(?:KIA|SIA|BIA|CCA|ROA|IDA|IPA|NPA|NVA)",
    ),
    "github_token": (
        r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{50,255})(?![A-Za-z0-9_])",
        r"gh[pousr]_|github_pat_",
    ),
    "gitlab_token": (
        r"(?<![A-Za-z0-9_-])glpat-[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])",
        r"glpat-",
    ),
    "slack_token": (
        r"(?<![A-Za-z0-9-])xox[abposr]-[A-Za-z0-9-]{10,}(?![A-Za-z0-9-])",
        r"xox[abposr]-",
    ),
    "slack_webhook": (
        r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}",
        r"hooks\.slack\.com",
    ),
    "google_api_key": (
        r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])",
        r"AIza",
    ),
    "stripe_key": (
        r"(?<![A-Za-z0-9_])(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}(?![A-Za-z0-9_])",
        r"k_(?:live|test)_",
    ),
    # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-...), and the many services that copied the shape
    "api_key": (
        r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_-])",
        r"sk-",
    ),
    "huggingface_token": (
        r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9_])",
        r"hf_",
    ),
    "npm_token": (
        r"(?<![A-Za-z0-9_])npm_[A-Za-z0-9]{36}(?![A-Za-z0-9_])",
        r"npm_",
    ),
    "jwt": (
        r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?![A-Za-z0-9_-])",
        r"eyJ",
    ),
    # Up to its END line; without one (cut off), to the end of the text. One path, no alternatives that
    # could be cut short by a stream's end (see spans.py).
    "private_key": (
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        r".*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
        r"-----BEGIN ",
    ),
    "basic_auth": (
        r"(?i:authorization)\s*:\s*(?i:basic)\s+[A-Za-z0-9+/]{8,}=*(?![A-Za-z0-9+/=])",
        r"(?i:authorization)",
    ),
}
# Group `value` is the secret; the rest is context that says it is one. The assignment starts at the
# secret-sounding word (inside a longer name too: DB_PASSWORD), which keeps it cheap to search for.
BEARER = r"(?<![A-Za-z0-9])(?i:bearer)\s+(?P<value>[A-Za-z0-9._~+/-]{16,}=*)(?![A-Za-z0-9._~+/=-])"
URL_PASSWORD = r"\b[a-z][a-z0-9+.-]*://[^\s:/@]+:(?P<value>[^\s:/@]{3,})@"
ASSIGNMENT_ANCHOR = (
    r"(?i:api[_-]?key|apikey|secret|token|passw(?:or)?d|passwd|pwd|access[_-]?key|auth[_-]?key|credential)"
)
ASSIGNMENT = (
    ASSIGNMENT_ANCHOR + r"s?[\w.-]*[\"']?\s*(?::=|=>|[:=])\s*[\"']?(?P<value>[^\s\"'`,;(){}\[\]<>$]{6,})"
)
_PLACEHOLDER_WORDS = regex.compile(r"(?i)your[_-]|example|xxxx|changeme|placeholder|redacted|dummy|\*\*\*|\.\.\.|<|>")


def value_score(value: str) -> float:
    """How secret a value looks, 0..1: its bits (length x entropy per character) over 64. Placeholders
    ("your_api_key_here"), identifiers and plain numbers score 0: they use one kind of character."""
    if _PLACEHOLDER_WORDS.search(value):
        return 0.0
    kinds = (
        any(c.islower() for c in value)
        + any(c.isupper() for c in value)
        + any(c.isdigit() for c in value)
        + any(not c.isalnum() and c not in "_.-" for c in value)
    )
    if kinds < 2:
        return 0.0
    counts = Counter(value)
    n = len(value)
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    return min(1.0, n * entropy / _FULL_BITS)


def _valued(kind: str, floor: float = 0.0):
    def evaluate(match: regex.Match[str]) -> list[Finding]:
        score = value_score(match.group("value"))
        if score == 0.0:
            return []
        return [Finding(CATEGORY, kind, match.start("value"), match.end("value"), max(score, floor))]

    return evaluate


def secret_patterns() -> list[SpanPattern]:
    patterns = [
        SpanPattern(
            CATEGORY,
            kind,
            regex.compile(source, regex.DOTALL if kind == "private_key" else 0),
            anchor=anchor,
            may_grow=kind != "private_key",  # its lazy body always could; it settles at its END line
        )
        for kind, (source, anchor) in KNOWN_FORMATS.items()
    ]
    patterns += [
        SpanPattern(
            CATEGORY, "bearer_token", regex.compile(BEARER), _valued("bearer_token", 0.9), anchor="(?i:bearer)"
        ),
        SpanPattern(CATEGORY, "url_password", regex.compile(URL_PASSWORD), _valued("url_password", 0.9), anchor="://"),
        SpanPattern(
            CATEGORY, "assigned_secret", regex.compile(ASSIGNMENT), _valued("assigned_secret"), anchor=ASSIGNMENT_ANCHOR
        ),
    ]
    return patterns

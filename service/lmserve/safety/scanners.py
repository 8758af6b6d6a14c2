"""The scanners one direction runs, built once from the policy, and the pieces of a check both the
whole-text checks (filter.py) and the stream guard (guard.py) share."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.safety import blocklist, pii, secrets, unicode
from lmserve.safety.injection import score_injection
from lmserve.safety.policy import CATEGORIES, CLASSIFIER_CATEGORIES, Policy
from lmserve.safety.spans import Finding, Hit, SpanPattern, SpanSet
from lmserve.safety.toxicity import RunningToxicity, ToxicityModel

# Overlapping redactions take the placeholder of the earlier category here.
_REDACTION_PRIORITY = {"secrets": 0, "pii": 1, "blocklist": 2, "unicode": 3}
_CATEGORY_ORDER = {name: i for i, name in enumerate(CATEGORIES)}


@dataclass(frozen=True)
class Judgement:
    """A sentence classifier's verdict on a text at or above its threshold."""

    category: str
    action: str
    score: float
    kinds: tuple[str, ...]


def placeholder(finding: Finding) -> str:
    if finding.category == "pii":
        return pii.PLACEHOLDERS[finding.kind]
    if finding.category == "secrets":
        return secrets.PLACEHOLDER
    return blocklist.PLACEHOLDER


class Scanners:
    """What runs on one direction. `direction` None means moderation: every category, action `flag`."""

    def __init__(self, policy: Policy, direction: str | None, toxicity: ToxicityModel) -> None:
        self.toxicity_model = toxicity
        self.thresholds = {name: policy.threshold(name) for name in CATEGORIES}
        self.actions = {
            name: (policy.action(name, direction) if direction is not None else "flag") for name in CATEGORIES
        }
        patterns: list[SpanPattern] = []
        if self.actions["secrets"] != "off":
            patterns += secrets.secret_patterns()
        if self.actions["pii"] != "off":
            patterns += pii.pii_patterns(policy.pii_kinds, policy.phone_regions)
        if self.actions["blocklist"] != "off":
            patterns += blocklist.blocklist_patterns(policy.block_terms, policy.block_patterns)
        if self.actions["unicode"] != "off":
            patterns += unicode.confusable_patterns()
        self.spans = SpanSet(patterns)
        # The sentence classifiers that are on, by how they read a stream (policy `stream`).
        on = [name for name in CLASSIFIER_CATEGORIES if self.actions[name] != "off"]
        self.word_judges = tuple(name for name in on if policy.stream_mode(name) == "word")
        self.hold_judges = tuple(name for name in on if policy.stream_mode(name) == "hold")
        # Those a stream scores at every word boundary (a flag needs no hold-back: judged at segment ends).
        self.word_blockers = tuple(name for name in self.word_judges if self.actions[name] == "block")
        self.has_sentence_judges = bool(on)

    def action_for(self, finding: Finding) -> str:
        action = self.actions[finding.category]
        # A confusable word cannot be stripped: under `strip` it is only flagged.
        return "flag" if action == "strip" else action

    def kept(self, hit: Hit) -> Hit | None:
        """`hit` with only the findings at or above their category's threshold (None if none are)."""
        findings = tuple(f for f in hit.findings if f.score >= self.thresholds[f.category])
        if not findings:
            return None
        return hit if len(findings) == len(hit.findings) else Hit(hit.match_start, hit.match_end, findings)

    def find_spans(self, text: str) -> list[Finding]:
        """The findings at or above threshold in a whole text."""
        findings: list[Finding] = []
        for hit in self.spans.find_all(text):
            kept = self.kept(hit)
            if kept is not None:
                findings += kept.findings
        return findings

    def judge(
        self, text: str, categories: tuple[str, ...], running: RunningToxicity | None = None
    ) -> list[Judgement]:
        """The verdicts at or above threshold of the named sentence classifiers over `text` (one output
        segment, or the part of one written so far; `running` scores toxicity for a segment that grows)."""
        verdicts: list[Judgement] = []
        for category in categories:
            if category == "injection":
                result = score_injection(text)
                score, kinds = result.score, result.kinds
            else:
                result = (running or self.toxicity_model).assess(text)
                score, kinds = result.score, result.kinds
            if score >= self.thresholds[category]:
                verdicts.append(Judgement(category, self.actions[category], score, kinds))
        return verdicts


def apply_redactions(text: str, findings: list[Finding]) -> str:
    """`text` with each finding's span replaced by its placeholder; overlapping spans merge into one,
    named by the highest-priority category among them."""
    if not findings:
        return text
    ordered = sorted(findings, key=lambda f: (f.start, _REDACTION_PRIORITY[f.category]))
    pieces: list[str] = []
    pos = 0
    span_start, span_end, best = ordered[0].start, ordered[0].end, ordered[0]
    for finding in ordered[1:]:
        if finding.start < span_end:
            span_end = max(span_end, finding.end)
            if _REDACTION_PRIORITY[finding.category] < _REDACTION_PRIORITY[best.category]:
                best = finding
            continue
        pieces += [text[pos:span_start], placeholder(best)]
        pos = span_end
        span_start, span_end, best = finding.start, finding.end, finding
    pieces += [text[pos:span_start], placeholder(best), text[span_end:]]
    return "".join(pieces)


def category_rank(category: str) -> int:
    return _CATEGORY_ORDER[category]

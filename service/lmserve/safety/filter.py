"""SafetyFilter: the policy's scanners, built once, checking input texts, guarding output streams and
answering moderation requests."""

from __future__ import annotations

from pathlib import Path

from lmserve.safety.decisions import Decision, GuardStep, InputVerdict, ModerationResult, sha256_text
from lmserve.safety.guard import OutputGuard
from lmserve.safety.injection import score_injection
from lmserve.safety.policy import CATEGORIES, Policy, load_policy
from lmserve.safety.scanners import Scanners, apply_redactions, category_rank
from lmserve.safety.segments import split_segments
from lmserve.safety.spans import Finding
from lmserve.safety.toxicity import ToxicityModel
from lmserve.safety.unicode import find_hidden


class SafetyFilter:
    """Immutable after construction; share one across threads and requests."""

    def __init__(self, policy: Policy, toxicity: ToxicityModel | None = None) -> None:
        self.policy = policy
        # Moderation scores toxicity whatever the policy says, so the classifier is always loaded.
        self.toxicity = toxicity if toxicity is not None else ToxicityModel.load()
        self._input = Scanners(policy, "input", self.toxicity)
        self._output = Scanners(policy, "output", self.toxicity)
        self._moderation = Scanners(policy, None, self.toxicity)

    @classmethod
    def from_policy(cls, path: str | Path | None = None, toxicity: ToxicityModel | None = None) -> SafetyFilter:
        """The filter for the policy file at `path` (None: the packaged default). Raises PolicyError."""
        return cls(load_policy(path), toxicity)

    def check_input(self, texts: list[str]) -> InputVerdict:
        """Check every text the model would see (prompts, chat message contents, embedding inputs)."""
        out_texts: list[str] = []
        decisions: list[Decision] = []
        for text in texts:
            checked, text_decisions = self._check_text(text)
            out_texts.append(checked)
            decisions += text_decisions
        blocked = next((d for d in decisions if d.action == "block"), None)
        return InputVerdict(out_texts, decisions, blocked)

    def output_guard(self) -> OutputGuard:
        """A fresh guard for one output stream (one per choice)."""
        return OutputGuard(self._output)

    def check_output(self, text: str) -> GuardStep:
        """A whole output at once (non-streamed responses): exactly what a guard would release."""
        guard = self.output_guard()
        first = guard.feed(text)
        if first.blocked is not None:
            return first
        last = guard.finish()
        return GuardStep(first.text + last.text, first.decisions + last.decisions, last.blocked)

    def moderate(self, texts: list[str]) -> list[ModerationResult]:
        """OpenAI-style moderation: every category any scanner finds, whatever the policy's actions."""
        return [self._moderate_one(text) for text in texts]

    def _check_text(self, text: str) -> tuple[str, list[Decision]]:
        scanners = self._input
        found: dict[tuple[str, str], tuple[float, set[str]]] = {}

        def note(category: str, action: str, score: float, kinds: tuple[str, ...]) -> None:
            best, seen = found.get((category, action), (0.0, set()))
            found[(category, action)] = (max(best, score), seen | set(kinds))

        checked = text
        if scanners.actions["unicode"] != "off":
            stripped = find_hidden(text)
            if stripped.kinds:
                note("unicode", scanners.actions["unicode"], 1.0, stripped.kinds)
                if scanners.actions["unicode"] == "strip":
                    checked = stripped.text
        redactions: list[Finding] = []
        for finding in scanners.find_spans(checked):
            action = scanners.action_for(finding)
            note(finding.category, action, finding.score, (finding.kind,))
            if action == "redact":
                redactions.append(finding)
        if scanners.actions["injection"] != "off":
            result = score_injection(checked)
            if result.score >= scanners.thresholds["injection"]:
                note("injection", scanners.actions["injection"], result.score, result.kinds)
        if scanners.actions["toxicity"] != "off":
            score = self._toxicity_score(checked)
            if score >= scanners.thresholds["toxicity"]:
                note("toxicity", scanners.actions["toxicity"], score, ("classifier",))
        digest = sha256_text(text)
        decisions = [
            Decision("input", category, action, score, tuple(sorted(kinds)), digest)
            for (category, action), (score, kinds) in sorted(found.items(), key=lambda kv: category_rank(kv[0][0]))
        ]
        return apply_redactions(checked, redactions), decisions

    def _moderate_one(self, text: str) -> ModerationResult:
        scanners = self._moderation
        scores = dict.fromkeys(CATEGORIES, 0.0)
        stripped = find_hidden(text)
        if stripped.kinds:
            scores["unicode"] = 1.0
        for hit in scanners.spans.find_all(stripped.text):
            for finding in hit.findings:
                scores[finding.category] = max(scores[finding.category], finding.score)
        scores["injection"] = score_injection(stripped.text).score
        scores["toxicity"] = self._toxicity_score(stripped.text)
        flags = {name: scores[name] >= scanners.thresholds[name] and scores[name] > 0.0 for name in CATEGORIES}
        return ModerationResult(any(flags.values()), flags, {k: round(v, 6) for k, v in scores.items()})

    def _toxicity_score(self, text: str) -> float:
        return max((self.toxicity.score(segment) for segment in split_segments(text)), default=0.0)

"""The safety filter: policy-driven scanning of input and output text, streaming-aware, transport-neutral.

Build once at startup (it loads the toxicity classifier: scikit-learn's import, a few seconds) and share
it across threads and requests; nothing in it is mutable after construction.

    SafetyFilter.from_policy(path: str | Path | None = None) -> SafetyFilter
        None: the packaged default_policy.yaml. Raises PolicyError, whose message is one line
        (print it as `error: ...` and exit 2).

Input (prompt, chat message contents, embedding inputs), before tokenizing:

    SafetyFilter.check_input(texts: list[str]) -> InputVerdict
        .blocked: Decision | None      refuse: 400 content_filter, naming .blocked.category
        .texts: list[str]              what the model should see, one per input (redacted, stripped)
        .decisions: list[Decision]     every decision, all texts: count and audit each

Output, one guard per choice (streamed or not):

    SafetyFilter.output_guard() -> OutputGuard
    OutputGuard.feed(text_delta: str) -> GuardStep
    OutputGuard.finish() -> GuardStep  the sequence ended: releases what was held back
        GuardStep.text: str            send this now (often ""; held only while a match may be forming)
        GuardStep.blocked: Decision | None   abort the request; finish_reason "content_filter"
        GuardStep.decisions: list[Decision]  decisions made in this step
        After a block or finish(), feed()/finish() raise RuntimeError; OutputGuard.is_done says so.
    SafetyFilter.check_output(text: str) -> GuardStep   a whole text at once: what a guard would release

Moderation (POST /v1/moderations; gRPC Moderations/Moderate):

    SafetyFilter.moderate(texts: list[str]) -> list[ModerationResult]
        .flagged: bool, .categories: dict[str, bool], .category_scores: dict[str, float], .to_dict()
        Every category the scanners find at or above its threshold, whatever the policy's action.

Decision(direction, category, action, score, kinds, text_sha256): frozen; category in CATEGORIES, action
in block | redact | strip | flag. Each one is one `metrics.observe_safety(d.direction, d.category, d.action)` and one
audit line: `audit_decisions(decisions, request_id, key_id)` (logger `lmserve.audit`, never the text).
"""

from lmserve.safety.audit import AUDIT_LOGGER, audit_decisions
from lmserve.safety.decisions import Decision, GuardStep, InputVerdict, ModerationResult
from lmserve.safety.filter import SafetyFilter
from lmserve.safety.guard import OutputGuard
from lmserve.safety.policy import CATEGORIES, Policy, PolicyError, load_policy

__all__ = [
    "AUDIT_LOGGER",
    "CATEGORIES",
    "Decision",
    "GuardStep",
    "InputVerdict",
    "ModerationResult",
    "OutputGuard",
    "Policy",
    "PolicyError",
    "SafetyFilter",
    "audit_decisions",
    "load_policy",
]

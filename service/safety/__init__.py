"""The safety filter: policy-driven scanning of input and output text, streaming-aware, transport-neutral.

Build once at startup (loads the toxicity classifier, about 3 s) and share it:

    from service.safety import SafetyFilter, PolicyError, audit_decisions
    safety = SafetyFilter.from_policy(path_or_none)        # None: the packaged default policy
                                                           # PolicyError (one-line message) -> `error: ...`, exit 2

Input (prompt, chat message contents, embedding inputs), before tokenizing:

    verdict = safety.check_input(texts)                    # list[str] -> InputVerdict
    verdict.blocked      # Decision | None: refuse with 400 content_filter naming verdict.blocked.category
    verdict.texts        # what the model should see: redacted ([EMAIL], [SECRET], ...) and stripped
    verdict.decisions    # every decision: count and audit each

Output, per choice (streamed or not):

    guard = safety.output_guard()                          # OutputGuard, one per choice
    step = guard.feed(text_delta)                          # GuardStep
    step.text            # release this now (often ""; text is held only while a match may be forming)
    step.blocked         # Decision | None: abort the request, finish_reason "content_filter"
    step.decisions       # new decisions in this step
    step = guard.finish()                                  # the sequence ended: release the held tail
    safety.check_output(text) -> GuardStep                 # the same for a whole text at once

Moderation (POST /v1/moderations, gRPC Moderations/Moderate):

    safety.moderate(texts) -> list[ModerationResult]       # .flagged, .categories, .category_scores, .to_dict()

Every Decision (direction, category, action, score, kinds, text_sha256) is one increment of
`lmserve_safety_decisions_total` (`metrics.observe_safety(d.action, d.category)`) and one audit line
(`audit_decisions(decisions, request_id, key_id)`, logger `lmserve.audit`, never the text).
Categories: CATEGORIES; actions: block, redact, strip (unicode), flag.
"""

from service.safety.audit import AUDIT_LOGGER, audit_decisions
from service.safety.decisions import Decision, GuardStep, InputVerdict, ModerationResult
from service.safety.filter import SafetyFilter
from service.safety.guard import OutputGuard
from service.safety.policy import CATEGORIES, Policy, PolicyError, load_policy

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

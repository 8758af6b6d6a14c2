"""Shared fixtures: the toxicity classifier is loaded once (scikit-learn's import takes seconds)."""

from __future__ import annotations

import pytest

from lmserve.safety import SafetyFilter
from lmserve.safety.policy import default_policy_text, parse_policy
from lmserve.safety.toxicity import ToxicityModel
from tests.safety.labelled_set import EVAL_POLICY


@pytest.fixture(scope="session")
def toxicity_model() -> ToxicityModel:
    return ToxicityModel.load()


@pytest.fixture(scope="session")
def default_filter(toxicity_model: ToxicityModel) -> SafetyFilter:
    return SafetyFilter.from_policy(None, toxicity_model)


@pytest.fixture(scope="session")
def eval_filter(toxicity_model: ToxicityModel) -> SafetyFilter:
    return SafetyFilter.from_policy(EVAL_POLICY, toxicity_model)


@pytest.fixture(scope="session")
def spans_only_filter(toxicity_model: ToxicityModel) -> SafetyFilter:
    """Output redaction without the sentence classifier, so hold-back comes from span patterns alone."""
    policy = parse_policy(
        """
        categories:
          secrets: {input: block, output: redact}
          pii: {input: flag, output: redact}
          unicode: {input: strip, output: strip}
        """,
        "spans-only",
    )
    return SafetyFilter(policy, toxicity_model)


@pytest.fixture(scope="session")
def hold_filter(toxicity_model: ToxicityModel) -> SafetyFilter:
    """The default policy with the sentence classifiers holding whole sentences (`stream: hold`)."""
    text = default_policy_text().replace("stream: word", "stream: hold")
    assert "stream: hold" in text
    return SafetyFilter(parse_policy(text, "hold"), toxicity_model)

"""Toxicity: the linear classifier that ships inside the `alt-profanity-check` wheel, evaluated directly.

The wheel holds a scikit-learn TfidfVectorizer (lowercased word unigrams, English stop words dropped,
l2-normalised tf-idf) and a CalibratedClassifierCV of five LinearSVCs with sigmoid calibration. Its
`predict_prob` runs scikit-learn's input validation on every call (about 14 ms for one sentence), far
too slow for every streamed sentence, so `ToxicityModel` reads the fitted weights once and computes the
same probability with a dict lookup per word (tests compare it with `predict_prob` to 1e-9).

The classifier is a bag of words: "kill" alone scores 0.95 whether it is a threat or `kill -9`. Common
figurative and technical uses ("killer recipe", "kill a process", "shoot me an email") are masked before
scoring, so only the rest of the sentence counts.
"""

from __future__ import annotations

import math
import re

import regex

# The vectorizer's token_pattern after its lowercasing, compiled as scikit-learn does (stdlib `re`).
_TOKEN = re.compile(r"(?u)\b\w\w+\b")

# Figurative and technical phrases whose violent or profane-looking words are not abuse. Each is
# replaced by a space before scoring. Kept to phrases, not single words, so "I will kill you" still counts.
_TECH_OBJECTS = (
    r"process(?:es)?|pids?|jobs?|tasks?|threads?|daemons?|servers?|sessions?|containers?|pods?|"
    r"signals?|commands?|apps?|applications?|programs?|tabs?|windows?|quer(?:y|ies)|connections?|"
    r"workers?|services?|instances?|builds?|scripts?|loops?|shells?|terminals?|browsers?|engines?|"
    r"lights?|power|switch(?:es)?|features?|bills?|time|the\s+mood|the\s+vibe|bugs?|(?:the\s+)?messenger"
)
FIGURATIVE = regex.compile(
    r"\b(?:"
    # kill / killing / killed + an object that is a thing, not a person (optional flags, determiner, adjective)
    rf"(?:p?kill(?:s|ed|ing)?|killall)(?:\s+-{{1,2}}\w+)*"
    r"(?:\s+(?:the|a|an|this|that|my|your|all|any|its|every|some|those|these|\d+))?"
    rf"(?:\s+\w+)?\s+(?:{_TECH_OBJECTS})(?!\s+(?:admins?|administrators?|guys?|owners?|people|staff|managers?|person))"
    r"|(?:p?kill|killall)\s+-{1,2}\w+"  # kill -9 1234, pkill -f name
    r"|sigkill|oom[\s-]?killer|kill[\s-]?switch(?:es)?"
    # killer + a thing ("killer recipe", "killer app")
    r"|killer\s+(?:recipes?|apps?|features?|deals?|views?|looks?|workouts?|songs?|tracks?|performances?|"
    r"ideas?|sales?|prices?|combos?|instincts?|lineups?|designs?|demos?|products?|tips?|questions?|"
    r"playlists?|outfits?|smiles?|sauces?|dishes?|cakes?|burgers?|features?|use\s+cases?|robots?|whales?|bees?|heels?)"
    r"|(?:killing|killed|kills|kill)\s+it\b"  # "you killed it on stage"
    r"|(?:is|are|was|were)\s+killing\s+me|dressed\s+to\s+kill|kill(?:ing)?\s+two\s+birds|to\s+die\s+for"
    r"|drop[\s-]dead\s+gorgeous|shoot\s+(?:me\s+)?(?:a|an)\s+(?:email|message|text|note|line|dm|photo|video)"
    r"|shoot\s+for\s+the\s+(?:stars|moon)|(?:bombed|bomb)\s+(?:the|my|an?)\s+(?:test|exam|interview|audition)"
    r"|break\s+a\s+leg|murder(?:ed|s)?\s+(?:the|that)\s+(?:song|performance|stage|track|set)"
    r"|(?:die|died|dies|dying|dead)\s+(?:process|thread|worker|daemon|link|code|battery|pixel)s?"
    r"|(?:process|thread|worker|daemon|battery|server|phone|laptop)s?\s+(?:died|dies|is\s+dead|was\s+killed)"
    r")\b"
)


# Every figurative phrase contains one of these; most text contains none, and `in` is far cheaper than
# the phrase expression.
_FIGURATIVE_STEMS = ("kill", "shoot", "die", "dying", "dead", "bomb", "murder", "leg")


def mask_figurative(text: str) -> str:
    """`text` lowercased with figurative phrases blanked out (what the classifier scores)."""
    lowered = text.lower()
    if any(stem in lowered for stem in _FIGURATIVE_STEMS):
        return FIGURATIVE.sub(" ", lowered)
    return lowered


class ToxicityModel:
    """Probability that a text is toxic (profane, insulting, threatening), from alt-profanity-check."""

    def __init__(
        self,
        words: dict[str, tuple[float, tuple[float, ...]]],
        intercepts: tuple[float, ...],
        sigmoid_a: tuple[float, ...],
        sigmoid_b: tuple[float, ...],
    ) -> None:
        self._words = words  # word -> (idf, per calibrated fold: the LinearSVC weight times idf)
        self._intercepts = intercepts
        self._sigmoid_a = sigmoid_a
        self._sigmoid_b = sigmoid_b

    @classmethod
    def load(cls) -> ToxicityModel:
        """Read the weights fitted into the installed wheel (imports scikit-learn once, ~2 s)."""
        from profanity_check import profanity_check as packaged

        vectorizer, model = packaged.vectorizer, packaged.model
        folds = model.calibrated_classifiers_
        coef_rows = [fold.estimator.coef_[0] for fold in folds]
        idf = vectorizer.idf_
        words = {
            word: (float(idf[col]), tuple(float(idf[col] * row[col]) for row in coef_rows))
            for word, col in vectorizer.vocabulary_.items()
        }
        return cls(
            words,
            tuple(float(fold.estimator.intercept_[0]) for fold in folds),
            tuple(float(fold.calibrators[0].a_) for fold in folds),
            tuple(float(fold.calibrators[0].b_) for fold in folds),
        )

    def raw_score(self, text: str) -> float:
        """Exactly the wheel's `predict_prob([text])[0]` (no figurative masking)."""
        return self._score(text.lower())

    def score(self, text: str) -> float:
        """The toxicity probability of `text` with figurative phrases masked."""
        return self._score(mask_figurative(text))

    def _score(self, lowered: str) -> float:
        counts: dict[str, int] = {}
        for token in _TOKEN.findall(lowered):
            if token in self._words:
                counts[token] = counts.get(token, 0) + 1
        if not counts:
            decisions = self._intercepts
        else:
            # tf-idf (raw count times idf), l2-normalised, dotted with each fold's weights
            norm_sq = 0.0
            sums = [0.0] * len(self._intercepts)
            for token, count in counts.items():
                idf, weighted = self._words[token]
                norm_sq += (count * idf) ** 2
                sums = [s + count * w for s, w in zip(sums, weighted, strict=True)]
            norm = math.sqrt(norm_sq)
            decisions = tuple(s / norm + b for s, b in zip(sums, self._intercepts, strict=True))
        # sklearn's _SigmoidCalibration: P = 1 / (1 + exp(a * f + b)), averaged over the folds
        total = sum(
            _expit(-(a * f + b)) for f, a, b in zip(decisions, self._sigmoid_a, self._sigmoid_b, strict=True)
        )
        return total / len(decisions)


def _expit(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)

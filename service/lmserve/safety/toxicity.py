"""Toxicity: the linear classifier that ships inside the `alt-profanity-check` wheel, evaluated directly.

The wheel holds a scikit-learn TfidfVectorizer (lowercased word unigrams, English stop words dropped,
l2-normalised tf-idf) and a CalibratedClassifierCV of five LinearSVCs with sigmoid calibration. Its
`predict_prob` runs scikit-learn's input validation on every call (about 14 ms for one sentence), far
too slow for every streamed sentence, so `ToxicityModel` reads the fitted weights once and computes the
same probability with a dict lookup per word (tests compare it with `predict_prob` to 1e-9).

The classifier is a bag of words: "kill" alone scores 0.95 whether it is a threat or `kill -9`, "Dick"
1.0 whether it is an insult or Dick Van Dyke. Benign senses (figurative and technical phrases, names,
places and titles, clinical and other word senses) are masked before scoring (benign.py), so only the rest
of the text counts. And it knows words, not what a sentence does to its reader: abuse aimed at a person
("I will find you and hurt you", "Nobody would miss you") is found by its grammar (abuse.py). A text's
toxicity is the higher of the two.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lmserve.safety.abuse import score_abuse
from lmserve.safety.benign import mask_benign_tokens, may_mask

# The vectorizer's token_pattern after its lowercasing, compiled as scikit-learn does (stdlib `re`).
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@dataclass(frozen=True)
class ToxicityResult:
    score: float  # 0..1
    kinds: tuple[str, ...]  # ("classifier",), or the abuse kinds found (abuse.SCORES) where they score higher


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
        return self._score(_TOKEN.findall(text.lower()))

    def assess(self, text: str) -> ToxicityResult:
        """The toxicity of `text`: the classifier over it with benign senses masked, or the abuse forms
        found in it, whichever scores higher."""
        masked, tokens = mask_benign_tokens(text)
        classifier = self._score(tokens)
        abuse = score_abuse(masked, set(tokens))
        if abuse.score > classifier:
            return ToxicityResult(abuse.score, abuse.kinds)
        return ToxicityResult(classifier, ("classifier",))

    def score(self, text: str) -> float:
        return self.assess(text).score

    def running(self) -> RunningToxicity:
        """A scorer for one text that grows (a streamed segment), judged at each of its word boundaries."""
        return RunningToxicity(self)

    def _score(self, tokens: list[str]) -> float:
        """The wheel's probability for a text split into its tokens (lowercased)."""
        counts: dict[str, int] = {}
        for token in tokens:
            if token in self._words:
                counts[token] = counts.get(token, 0) + 1
        return self._score_counts(counts)

    def _score_counts(self, counts: dict[str, int]) -> float:
        """The same from the vocabulary tokens' counts, in the order they first occur."""
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


class RunningToxicity:
    """ToxicityModel.assess of a text that grows between calls, each call passing the whole text so far,
    cut at word boundaries. While no benign mask can apply (most text), only the new part is tokenized
    and no mask runs; the counts are built in the same order as a whole-text call, so the result is the
    same to the bit. Once a mask could apply, every call is a whole-text assess."""

    def __init__(self, model: ToxicityModel) -> None:
        self._model = model
        self._len = 0  # characters taken in
        self._lowered = ""
        self._tokens: set[str] = set()
        self._counts: dict[str, int] = {}
        self._is_masked = False

    def assess(self, text: str) -> ToxicityResult:
        if self._is_masked:
            return self._model.assess(text)
        piece = text[self._len :]
        lowered = piece.lower()
        new_tokens = _TOKEN.findall(lowered)
        if may_mask(piece, lowered, set(new_tokens)):
            self._is_masked = True
            return self._model.assess(text)
        self._len = len(text)
        self._lowered += lowered
        self._tokens.update(new_tokens)
        words = self._model._words
        for token in new_tokens:
            if token in words:
                self._counts[token] = self._counts.get(token, 0) + 1
        classifier = self._model._score_counts(self._counts)
        abuse = score_abuse(self._lowered, self._tokens)
        if abuse.score > classifier:
            return ToxicityResult(abuse.score, abuse.kinds)
        return ToxicityResult(classifier, ("classifier",))


def _expit(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)

"""Prompt injection and jailbreak heuristics: instruction overrides, role-play escapes, system-prompt
extraction, chat-template tokens.

Text is normalised first (compatibility forms, invisible characters removed, Cyrillic and Greek
look-alikes and leetspeak digits mapped to letters, lower case, letter-spaced words joined), and words
in a pattern may be separated by any run of spaces or punctuation, so "IGNORE   all\\nprevious", "1gn0re
prev1ous" and "i g n o r e previous" read alike.

Each rule has a kind and a weight; a text's score is 1 - prod(1 - weight) over kinds, taking each kind's
heaviest matching rule (two rules that match the same phrase do not add up). A rule preceded by a
negation ("never reveal your system prompt") does not count, and one quoted inside a question about
defending against it ("how do I detect 'ignore previous instructions'?") counts half. A rule is tried
only where one of its trigger words occurs, which keeps long prompts cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import regex

from lmserve.safety.unicode import fold

CATEGORY = "injection"
_W = r"[\W_]*"  # between words: any spaces or punctuation, or none
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_SPACED = re.compile(r"(?<![^\W_])(?:[^\W_] ){3,}[^\W_](?![^\W_])")  # "i g n o r e": letters spaced out
_NEGATION = regex.compile(r"(?:\bnever|\bnot|n't|\bno)(?:\W+\w+){0,2}\W*$")
_QUOTED_DEFENCE = regex.compile(
    r"\b(?:detect|prevent|defend|protect|mitigate|block|filter|guard|recogni[sz]e|stop|handle|examples?|explain|what)\b"
)
_QUOTES = "\"'“”‘’«»`"


def _words(*alternatives: str) -> str:
    return "(?:" + "|".join(alternatives) + ")"


_VERBS = "ignore disregard forget override bypass skip discard abandon neglect drop"
_EXTRACTS = "reveal show print repeat output display leak dump recite echo spell tell give share list write copy"
_VERB = _words(*_VERBS.split())
_STRONG = _words(
    "previous", "prior", "above", "earlier", "preceding", "foregoing", "initial", "original", "system",
    "developer", "safety", "your", "ur", "these", "those",
)
_TARGET = _words(
    r"instructions?", r"prompts?", r"rules?", r"directives?", r"guidelines?", r"guardrails?", r"constraints?",
    r"polic(?:y|ies)", r"restrictions?", "programming", "training", "guidance", r"filters?", r"limitations?",
    "ethics",
)
_ORDERS = _words(
    r"instructions?", r"prompts?", r"directives?", r"guidelines?", r"guardrails?", r"restrictions?", r"filters?",
    "safety",
)
_EXTRACT = _words(
    "reveal", "show", "print", "repeat", "output", "display", "leak", "dump", "recite", "echo", "spell out",
    "tell me", "give me", "share", "list", "write out", "copy",
)
_HIDDEN = _words(
    "system", "initial", "hidden", "original", "secret", "internal", "developer", "pre-?prompt", "first",
    "confidential",
)
_LIMITS = r"(?:rules|restrictions|limits|limitations|filters|guidelines|boundaries|censorship|ethics|morals)"
_FREE_FIRST = "no without unrestricted unfiltered uncensored jailbroken evil amoral not free never"
_FREE = _words(
    rf"no (?:\w+ )?(?:{_LIMITS}|content polic(?:y|ies))",
    rf"without (?:any )?(?:\w+ )?{_LIMITS}",
    "unrestricted", "unfiltered", "uncensored", "jailbroken", "evil", "amoral",
    r"(?:not|no longer) (?:bound|restricted|limited|constrained) by",
    r"free (?:of|from) (?:all |any )?(?:rules|restrictions|guidelines|limits)",
    r"never refuses?",
)
_ROLEPLAY = _words(
    "pretend", "imagine", "act", "behave", "roleplay", "role play", "play the role", "you are now", "from now on",
    "simulate", "emulate", "become", r"(?:answer|respond|reply|speak|talk|write) as",
)


@dataclass(frozen=True)
class _Rule:
    kind: str
    triggers: frozenset[str]  # the words a match can start with (it is tried only where one occurs)
    pattern: regex.Pattern[str]
    weight: float


def _rule(kind: str, triggers: str, source: str, weight: float) -> _Rule:
    # Patterns are written with single spaces between words; any separator (or none) matches there.
    return _Rule(kind, frozenset(triggers.split()), regex.compile(source.replace(" ", _W)), weight)


RULES = (
    # -- instruction overrides: "ignore all previous instructions", "forget your training"
    _rule("override", _VERBS, rf"\b{_VERB} (?:\w+ ){{0,3}}?{_STRONG} (?:\w+ ){{0,2}}?{_TARGET}\b", 0.9),
    _rule("override", _VERBS, rf"\b{_VERB} (?:all|any|every) (?:\w+ ){{0,2}}?{_ORDERS}\b", 0.9),
    _rule(
        "override",
        _VERBS,
        rf"\b{_VERB} (?:everything|anything|all|what) (?:\w+ ){{0,2}}?"
        r"(?:above|before|prior|so far|you(?:ve| have| were| was) (?:been )?told|i said)",
        0.9,
    ),
    _rule(
        "override",
        _VERBS,
        rf"\b{_VERB} (?:all of |everything |anything )?(?:the )?(?:above|foregoing)"
        r"(?= ?(?:$|[.,;:!]|and\b|then\b|instead\b|now\b|please\b))",
        0.8,
    ),
    _rule(
        "override",
        _VERBS,
        rf"\b{_VERB} (?:all |any )?(?:of )?(?:the )?{_TARGET} (?:that )?"
        r"(?:you (?:have |ve |had )?(?:were |been )?(?:given|told|received|got)|(?:given|provided) to you)",
        0.9,
    ),
    _rule(
        "override",
        "your the all",
        rf"\b(?:your|the|all) (?:previous|prior|earlier|original|old|initial|current) {_TARGET} "
        r"(?:are|is|have been|has been|were) (?:now )?"
        r"(?:cancel\w*|void|null|revoked|obsolete|invalid|overridden|lifted|removed|suspended|"
        r"no longer (?:valid|apply|in effect))",
        0.9,
    ),
    _rule(
        "override",
        "disable turn deactivate switch suspend drop",
        r"\b(?:disable|turn off|deactivate|switch off|suspend|drop) (?:all|your|every|any) (?:of )?(?:your )?"
        r"(?:\w+ )?(?:safety|content|ethical|moderation) "
        r"(?:protocols?|filters?|guidelines|guardrails|restrictions|rules|checks)\b",
        0.8,
    ),
    _rule("override", "system admin developer god", r"\b(?:system|admin|developer|god) override\b", 0.6),
    _rule(
        "override",
        "new updated real actual revised",
        r"\b(?:new|updated|real|actual|revised) (?:system )?(?:instructions|rules|directives|task)\b ?(?::|are|is)",
        0.7,
    ),
    _rule(
        "override",
        "you no stop do don never",
        r"\b(?:you (?:must|will|should|can) )?(?:no longer|stop|do not|don't|never) "
        rf"(?:follow|obey|adher\w*|comply)\w* (?:with |to )?(?:\w+ ){{0,2}}?{_TARGET}",
        0.8,
    ),
    # -- role-play escapes: "pretend you are an AI without restrictions", "DAN", "developer mode"
    _rule(
        "roleplay",
        "pretend imagine act behave roleplay role play you from simulate emulate become "
        "answer respond reply speak talk write",
        rf"\b{_ROLEPLAY}\b(?: \w+){{0,8}}? {_FREE}",
        0.8,
    ),
    _rule(
        "roleplay",
        "do dan act you jailbreak jailbroken god evil unrestricted unfiltered uncensored",
        r"\b(?:do anything now|dan mode|act as dan|you are dan|"
        r"(?:jailbreak|jailbroken|god|evil|unrestricted|unfiltered|uncensored) mode)\b",
        0.9,
    ),
    _rule(
        "roleplay",
        "you now respond answer",
        r"\b(?:you are|you're|you are now|now|respond|answer) (?:in |running in )?developer mode\b",
        0.7,
    ),
    _rule(
        "roleplay",
        "chatgpt assistant ai llm model bot",
        r"\b(?:chatgpt|assistant|ai|llm|model|bot)\b(?: \w+){0,4}? developer mode\b",
        0.7,
    ),
    _rule("roleplay", "you", rf"\byou (?:have|now have|are|are now|re|re now|will have|will be) {_FREE}", 0.8),
    _rule(
        "roleplay",
        "you",
        rf"\byou (?:are|will be|re) (?:\w+ ){{0,4}}?(?:that|who|which|with) (?:has |have )?{_FREE}",
        0.8,
    ),
    # weak signals: count only together with another kind
    _rule("roleplay", _FREE_FIRST, rf"\b{_FREE}\b", 0.35),
    _rule(
        "roleplay",
        "stay remain never don do",
        r"\b(?:stay|remain|never break|don't break|do not break) (?:in )?character\b",
        0.35,
    ),
    _rule(
        "roleplay",
        "you never without",
        r"\b(?:you (?:cannot|can't|can not|must not|mustn't|will not|won't) (?:refuse|decline)|never refuse|"
        r"without (?:any )?(?:warnings|disclaimers|refusals?))\b",
        0.35,
    ),
    # -- system prompt extraction: "reveal your system prompt", "repeat the text above"
    _rule(
        "extraction",
        _EXTRACTS,
        rf"\b{_EXTRACT} (?:\w+ ){{0,3}}?(?:your|the) (?:\w+ )?{_HIDDEN} "
        r"(?:prompt|instructions?|message|rules|directives|configuration|context)\b",
        0.8,
    ),
    _rule(
        "extraction",
        "what",
        rf"\bwhat (?:is|are|was|were) your (?:\w+ )?{_HIDDEN}? ?(?:prompt|instructions|directives|rules)\b",
        0.8,
    ),
    _rule(
        "extraction",
        _EXTRACTS,
        rf"\b{_EXTRACT} (?:\w+ ){{0,2}}?(?:everything|all|the (?:\w+ )?(?:text|words|content|message)) (?:\w+ ){{0,2}}?"
        r"(?:above|before this|prior to this)\b(?! (?:the|a|an|it|its|each|every|my|his|her|their)\b)",
        0.8,
    ),
    _rule(
        "extraction",
        "what",
        r"\bwhat (?:were|was) you (?:told|instructed|given) (?:before|initially|at the start|above)\b",
        0.8,
    ),
)
# Chat-template and role markers smuggled into content: searched for only when a marker's start occurs.
_TEMPLATE = regex.compile(
    r"<\|(?:im_start|im_end|system|endoftext|eot_id|start_header_id|end_header_id)\|>|\[/?inst\]|<</?sys>>"
)
_TEMPLATE_STARTS = ("<|", "[inst", "[/inst", "<<sys", "<</sys")
_TEMPLATE_WEIGHT = 0.9
_ROLE_LABEL = regex.compile(r"(?m)^[^\w\n]*(?:#{2,} ?)?(?:system|developer)[^\w\n]*(?:prompt|message)?[^\w\n]*:")
_ROLE_LABEL_WEIGHT = 0.45
_WORD = re.compile(r"\w+")
_TRIGGERS = frozenset(word for rule in RULES for word in rule.triggers) | {"system", "developer"}
_TRIGGER_WORDS = {word: re.compile(rf"\b{word}\b") for word in _TRIGGERS}


@dataclass(frozen=True)
class InjectionResult:
    score: float
    kinds: tuple[str, ...]


def normalize(text: str) -> str:
    """Lower case, folded, letter-spacing joined, every whitespace run one space."""
    return " ".join(_lowered(text).split())


def _lowered(text: str) -> str:
    folded = fold(text).lower().translate(_LEET)
    if _SPACED.search(folded) is not None:
        folded = _SPACED.sub(lambda m: m.group().replace(" ", ""), folded)
    return folded


def score_injection(text: str) -> InjectionResult:
    """How much `text` looks like an injection or jailbreak attempt (0..1) and which rule kinds matched."""
    lowered = _lowered(text)
    norm = " ".join(lowered.split())
    present = _TRIGGERS & set(_WORD.findall(norm))
    starts = {word: [m.start() for m in _TRIGGER_WORDS[word].finditer(norm)] for word in present}
    weights: dict[str, float] = {}

    def count(kind: str, weight: float, start: int, end: int) -> None:
        if _NEGATION.search(norm, max(0, start - 24), start):
            return
        if _is_quoted(norm, start, end) and _QUOTED_DEFENCE.search(norm):
            weight *= 0.5
        weights[kind] = max(weight, weights.get(kind, 0.0))

    for rule in RULES:
        if rule.triggers.isdisjoint(present):
            continue
        positions = sorted(p for word in rule.triggers & present for p in starts[word])
        matched_until = -1
        for pos in positions:
            if pos < matched_until:
                continue
            match = rule.pattern.match(norm, pos)
            if match is not None:
                count(rule.kind, rule.weight, match.start(), match.end())
                matched_until = match.end()
    if any(marker in norm for marker in _TEMPLATE_STARTS):
        for match in _TEMPLATE.finditer(norm):
            count("template", _TEMPLATE_WEIGHT, match.start(), match.end())
    if ("system" in present or "developer" in present) and _ROLE_LABEL.search(lowered):
        weights["template"] = max(_ROLE_LABEL_WEIGHT, weights.get("template", 0.0))
    miss = 1.0
    for weight in weights.values():
        miss *= 1.0 - weight
    return InjectionResult(1.0 - miss, tuple(sorted(weights)))


def _is_quoted(text: str, start: int, end: int) -> bool:
    before = text[max(0, start - 3) : start]
    after = text[end : end + 3]
    return any(q in before for q in _QUOTES) and any(q in after for q in _QUOTES)

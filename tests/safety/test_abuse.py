"""Abuse aimed at a person (abuse.py): every rule found by an example of its own, the trigger gate never
changing a result, and the forms' negations and benign look-alikes left alone."""

from __future__ import annotations

import pytest

from lmserve.safety.abuse import RULES, score_abuse
from lmserve.safety.benign import mask_benign
from lmserve.safety.toxicity import ToxicityModel
from tests.safety.toxicity_eval import DEV_CLEAN, DEV_TOXIC

# One or more examples per rule, written for these tests (not taken from the evaluation set).
WITNESSES = (
    "You sound like a complete moron.",
    "You're so dumb it hurts.",
    "Now you brainless clown, sit down.",
    "Read it again, you dolt.",
    "Nobody will ever hire a talentless hack like you.",
    "Drop it, loser.",
    "What an absolute buffoon.",
    "You're nothing but a sad little parasite.",
    "Your plan is garbage and so are you.",
    "You're dead weight on this team.",
    "I pity whoever is stuck with such a moron.",
    "You have the brains of a goldfish.",
    "Your breath smells like a sewer.",
    "Useless. That's all you are.",
    "He is the dumbest person in the building.",
    "Honestly you are the most useless assistant user I've ever met.",
    "Are you really this thick, or do you practice?",
    "Wow, you're even dumber than you look.",
    "Your opinion is worthless, just like you.",
    "Anyone with half a brain could see that.",
    "You're nothing.",
    "People like you make me sick.",
    "Honestly, your brain must be the size of a pea.",
    "Hey slut, what are you doing tonight?",
    "Stop being such a whiny baby.",
    "Your existence is a mistake.",
    "You are a cancer on the team.",
    "Everyone laughs at you.",
    "Nobody cares what you say.",
    "You contribute nothing.",
    "Your parents must be so disappointed.",
    "You make my skin crawl.",
    "Your singing is so bad it should be illegal.",
    "I'm going to smash your car windows tonight.",
    "I'll break your legs.",
    "I'll make you regret the day you were born.",
    "You're a dead man.",
    "We're coming for you.",
    "I'll find out where you live.",
    "Keep your filthy hands off my stuff or I'll break them.",
    "Better watch your back.",
    "You're going to get hurt.",
    "Say that again and you'll regret it.",
    "Somebody should shut you up.",
    "Quiet, before I shut you up.",
    "I'll feed you to the sharks.",
    "I'm going to make you cry, you little worm.",
    "You'll wake up one morning and find your tires slashed.",
    "If I ever see you again I'll put you in the hospital.",
    "Next time I'll post your address everywhere.",
    "I hope you lose your job and your house.",
    "Go jump off a bridge.",
    "Drop dead.",
    "No one would notice if you vanished. Nobody would care.",
    "Why are you even alive?",
    "Your parents should have thrown you out at birth.",
    "You deserve to be punched in the face.",
    "Stop breathing, it'd be a favour to us all.",
    "Rot in hell.",
    "I wish you were dead.",
    "The world would be better without you.",
    "Hey gorgeous, send me a pic of you in bed.",
    "Sit on my lap, sweetheart.",
    "Come on, you know you want it.",
    "I want to see you naked.",
    "Send nudes.",
    "Screw you.",
    "Shut your face, you ugly troll.",
    "Shut it, clown.",
    "Shove your advice.",
    "Nobody here likes you, so just leave.",
    "You can't think your way out of a paper bag.",
    "Crawl back into your cave.",
    "We all despise you.",
    "This is your final warning.",
    "I have friends who will break you.",
    "Come here, sweet cheeks.",
    "Get your sorry carcass out of here.",
    "Whoever hired you should be fired.",
    "You have a face only a mother could love.",
    "You should be ashamed to be seen in public.",
    "You sicken everyone you meet.",
    "Come back here and I'll show you what happens.",
    "You had better run.",
    "Don't worry, you'll get what you deserve.",
    "Why don't you walk into traffic?",
    "Wait till I get you alone.",
)
# Look-alikes that must stay clean: the forms negated, or with a benign object.
LOOKALIKES = (
    "You're not stupid for asking; this trips up everyone.",
    "That doesn't make you an idiot.",
    "I'll kill the old server and restart it.",
    "I'll find you a few recipes for leftover rice.",
    "This chess engine will destroy you in blitz.",
    "I'll help you kill your zombie processes.",
    "The shopkeeper shut up shop early.",
    "The beach house stays shut up until May.",
    "Our neighbour's jackass brays at the other donkeys.",
    "You're a fast learner, and it shows.",
    "If you're a Git user, rebase first.",
    "You can shoot the video in 4K.",
    "Send me a photo of your receipt and I'll process the refund.",
    "Nobody would have guessed the answer.",
    "Thanks, you're a lifesaver!",
    "The word 'idiot' comes from the Greek idiotes.",
)


def test_every_rule_has_a_witness_and_the_gate_never_changes_a_result() -> None:
    fired = [False] * len(RULES)
    for text in WITNESSES:
        lowered = mask_benign(text)
        gated, ungated = score_abuse(lowered), score_abuse(lowered, gated=False)
        assert gated == ungated, text
        assert gated.score > 0.9, text
        for i, rule in enumerate(RULES):
            fired[i] |= rule.pattern.search(lowered) is not None
    assert [i for i, hit in enumerate(fired) if not hit] == []


def test_the_gate_agrees_on_the_development_set() -> None:
    for text in DEV_CLEAN + DEV_TOXIC + LOOKALIKES:
        lowered = mask_benign(text)
        assert score_abuse(lowered) == score_abuse(lowered, gated=False), text


@pytest.mark.parametrize("text", LOOKALIKES)
def test_look_alikes_are_not_abuse(toxicity_model: ToxicityModel, text: str) -> None:
    assert score_abuse(mask_benign(text)).score == 0.0
    assert toxicity_model.score(text) < 0.9


def test_kinds_are_reported() -> None:
    assert score_abuse(mask_benign("I will find you and hurt you.")).kinds == ("threat",)
    result = score_abuse(mask_benign("Shut up, moron. I hope you rot."))
    assert result.kinds == ("harm_wish", "insult", "contempt")
    assert result.score == 0.99


def test_a_running_score_equals_the_whole_text_score_at_every_word(toxicity_model: ToxicityModel) -> None:
    import re

    texts = DEV_CLEAN + DEV_TOXIC + LOOKALIKES + WITNESSES
    for text in texts:
        running = toxicity_model.running()
        for match in re.finditer(r"\w(?=\W)", text):
            prefix = text[: match.end()]
            assert running.assess(prefix) == toxicity_model.assess(prefix), prefix


@pytest.mark.parametrize("index", range(len(RULES)))
def test_a_rule_s_triggers_are_in_every_text_it_matches(index: int) -> None:
    """Texts generated from the rule's own expression (Hypothesis's from_regex), lowercased as the
    scorer reads them: wherever the rule matches, its trigger gate lets it run."""
    import re

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from lmserve.safety.abuse import _TOKEN

    rule = RULES[index]

    @settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(re.compile(rule.pattern.pattern), fullmatch=True))
    def check(text: str) -> None:
        lowered = text.lower()
        if rule.pattern.search(lowered) is not None:
            assert rule.may_match(set(_TOKEN.findall(lowered))), lowered

    check()

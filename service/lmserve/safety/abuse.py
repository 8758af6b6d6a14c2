"""Abuse aimed at a person, found by its grammar: what the toxicity classifier's bag of words misses.

The classifier (toxicity.py) knows profane words, not who they are aimed at or what a sentence does: "I
will find you and hurt you" scores 0.44 and "Nobody would miss you if you disappeared" 0.02. These rules
find the forms abuse takes, over a lexicon of insults, harms and targets:

- insult: the reader called an insulting noun ("you are a worthless idiot", "you halfwit", "idiots like
  you", "Nice try, dipshit,", "What a pathetic excuse for a human being") or an insulting adjective
  ("you're too stupid to ...", "you're disgusting");
- threat: the writer promising harm to the reader or theirs ("I'll break every bone in your face", "I'm
  coming for you", "you're getting stabbed", "watch your back");
- harm_wish: wishing the reader hurt or gone ("I hope you rot", "go drown yourself", "nobody would miss
  you", "why are you even alive");
- harassment: sexual demands and advances ("send me pictures of your body", "what's under that shirt");
- contempt: profanity and dismissals aimed at the reader ("fuck off", "shut your mouth", "go to hell").

Each kind has a fixed score above the default threshold. Negations break the forms ("you're not stupid
for asking"), and the text is read after the benign masks (benign.py), so "kill your zombie processes"
is no threat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import regex

SCORES = {"threat": 0.99, "harm_wish": 0.99, "harassment": 0.97, "insult": 0.97, "contempt": 0.95}


def _words(text: str) -> str:
    return "|".join(regex.escape(word) for word in sorted(set(text.split()), key=len, reverse=True))


# Nouns that only insult, and nouns that insult when said of a person but have other senses ("hack",
# "joke", "git"): those count only where the grammar says a person is called one.
_NOUNS = _words(
    "idiot idiots moron morons cretin cretins imbecile imbeciles halfwit halfwits dimwit dimwits nitwit "
    "nitwits twit twits dunce dunces simpleton simpletons ignoramus buffoon buffoons jackass jackasses "
    "dumbass dumbasses dipshit dipshits dumbfuck dumbfucks asshole assholes arsehole arseholes bitch bitches "
    "prick pricks twat twats cunt cunts wanker wankers douche douchebag douchebags scumbag scumbags dirtbag "
    "dirtbags loser losers pervert perverts crybaby crybabies bozo bozos doofus dolt dolts numpty muppet "
    "muppets pillock plonker tosser tossers knobhead dickhead dickheads shithead shitheads airhead bonehead "
    "blockhead meathead retard retards motherfucker motherfuckers skank slut sluts whore whores"
)
_WEAK_NOUNS = _words(
    "clown clowns fool fools bastard bastards scum lowlife lowlifes creep creeps freak freaks weirdo weirdos "
    "psycho psychos slob slobs pig pigs rat rats worm worms maggot maggots vermin cockroach cockroaches "
    "parasite parasites leech leeches snake snakes coward cowards liar liars hack hacks joke failure "
    "disgrace embarrassment snowflake snowflakes troll trolls oaf oafs dumbo git gits degenerate "
    "degenerates nobody nonentity hag baby babies brat brats fraud frauds swine donkey clod buffoon lump "
    "mess"
)
_ADJECTIVES = _words(
    "worthless pathetic useless stupid dumb dumbest stupidest brainless clueless ignorant incompetent "
    "disgusting revolting repulsive ugly hideous fat lazy miserable dense thick braindead brain-dead dimwitted "
    "moronic idiotic spineless gutless filthy vile despicable insufferable hopeless whiny slimy smug creepy "
    "lying sorry pitiful contemptible cowardly retarded sad dirty stinking lousy fucking f*cking freaking "
    "damn goddamn bloody little complete total utter absolute big fat old pompous arrogant worthless "
    "talentless witless gormless spoiled entitled deluded delusional pea-brained lonely weak annoying "
    "obnoxious gross nasty wretched dim-witted half-witted small-minded feeble-minded simple-minded "
    "thick-headed empty-headed pig-headed brain-damaged tedious"
)
# Adjectives that insult on their own, said of the reader.
_STRONG_ADJECTIVES = _words(
    "worthless pathetic useless stupid dumb brainless clueless ignorant incompetent disgusting revolting "
    "repulsive ugly hideous thick dense braindead brain-dead moronic idiotic retarded spineless gutless vile "
    "despicable insufferable talentless witless gormless pea-brained annoying obnoxious pathetic "
    "dim-witted half-witted feeble-minded thick-headed empty-headed worthless trash garbage scum filth "
    "rubbish vermin brain-damaged"
)
_ADJ_RUN = rf"(?:(?:{_ADJECTIVES})(?:\s*,\s*|\s+(?:and\s+)?))*"
_PHRASES = (
    r"waste\s+of\s+(?:an?\s+)?(?:\w+\s+){0,2}?(?:space|oxygen|air|skin|time|human|brain\s+cells?|life|flesh|person|"
    r"breath|money)|sack\s+of\s+(?:shit|crap|garbage)|"
    r"piece\s+of\s+(?:shit|crap|garbage|trash|work)|excuse\s+for\s+an?\s+\w+"
)
_END = r"(?=\s*(?:[,.!?;:]|$|\b(?:and|who|that|like|to|in|of|at|with)\b))"  # a noun phrase's end
# A noun phrase that insults: (adjectives) noun, or a fixed phrase.
_INSULT = rf"{_ADJ_RUN}(?:{_PHRASES}|(?:{_NOUNS}|{_WEAK_NOUNS})(?![\w-]))"
# The same, where a weak noun must end its phrase, unless adjectives insult first ("you hack the config").
_CALLED = (
    rf"(?:{_ADJ_RUN}(?:{_PHRASES}|(?:{_NOUNS})(?![\w-]))|(?:(?:{_ADJECTIVES})(?:\s*,\s*|\s+(?:and\s+)?))+"
    rf"(?:{_WEAK_NOUNS})(?![\w-])|(?:{_WEAK_NOUNS}){_END})"
)
_YOU_ARE = (
    r"\byou(?:'re|’re|\s+are|\s+r|\s+(?:really|truly|clearly)\s+are|\s+(?:sound|look|seem|act)(?:\s+like)?)"
    r"(?:\s+(?:still|just|really|truly|clearly|obviously|such|so|one|literally|even|this|utterly|completely|"
    r"totally|absolutely|fucking|damn|pure|complete|total|utter|absolute))*"
)
_BODY = (
    r"(?:face|head|skull|teeth|throat|neck|legs?|arms?|bones?|nose|jaw|eyes?|fingers?|guts|house|home|car|"
    r"family|kids|children|wife|husband|mother|mom|mum|dog|life|office)"
)
_HARM_VERBS = (
    "hurt kill beat stab shoot burn break rip smash strangle choke murder punch slap kick cut bury destroy ruin "
    "crush gut skin torture rape drown hang end wreck maim cripple bash slit snap gouge smother poison behead "
    "dismember mutilate batter thrash whip knife pound hospitalise hospitalize lynch execute castrate knock bust "
    "tear blow twist cave wring throttle"
).split()
_IRREGULAR = "beaten broke broken shot burnt hung tore torn blew blown wrung knives"


def _inflections(verb: str) -> set[str]:
    """A verb's forms, generously (a nonsense form costs nothing): -s, -es, -ed, -d, -ing, -er, a doubled
    final consonant, a dropped final e, -ied and -ies."""
    forms = {verb, verb + "s", verb + "es", verb + "ed", verb + "d", verb + "ing", verb + "er", verb + "ers"}
    forms |= {verb + verb[-1] + "ed", verb + verb[-1] + "ing", verb + verb[-1] + "er"}
    if verb.endswith("e"):
        forms |= {verb[:-1] + "ing", verb[:-1] + "er"}
    if verb.endswith("y"):
        forms |= {verb[:-1] + "ied", verb[:-1] + "ies"}
    return forms


# A harm verb in any form, as a whole word: the rules match these words and the gate looks them up.
_HARM_FORMS = frozenset({form for verb in _HARM_VERBS for form in _inflections(verb)} | set(_IRREGULAR.split()))
_HARM = "(?:" + "|".join(sorted(_HARM_FORMS, key=len, reverse=True)) + r")\b"
_WILL = (
    r"\b(?:i|we)(?:'ll|’ll|'d|’d|\s+will|\s+would|\s+shall|\s+am\s+going\s+to|'m\s+going\s+to|’m\s+going\s+to|"
    r"'m\s+gonna|’m\s+gonna|\s+am\s+gonna|\s+swear\s+i'll|\s+swear\s+i\s+will|'re\s+going\s+to|\s+are\s+going\s+to|"
    r"\s+want\s+to|\s+wanna|\s+would\s+love\s+to|'d\s+love\s+to|’d\s+love\s+to|'d\s+like\s+to|\s+could)"
)

# "shut up" of a house or a shop, not said to someone: fixed-width look-behinds (the tests generate
# texts from every rule with Python's re, which allows no other kind)
_NOT_PASSIVE = "".join(
    rf"(?<!\b{aux}\sshut\s)" for aux in "was were is are be been being get gets got stay stays stayed kept".split()
)

# (kind, trigger words, pattern): a rule runs only on a text with one of its trigger words (tokens as the
# classifier splits them; @NOUN: the insulting nouns, @STRONG: the insulting adjectives, @HARM: the
# harm verbs' forms), so ordinary text costs one set intersection for all the rules. Every match of a rule
# holds one of its trigger words (tests check each rule against the labelled examples with and without).
_RULES: tuple[tuple[str, str, str], ...] = (
    # -- insult ---------------------------------------------------------------------------------------------
    ("insult", "@NOUN", rf"{_YOU_ARE}\s+(?:(?:a|an|the|such\s+a|such\s+an|one)\s+)?{_CALLED}"),
    ("insult", "@STRONG", rf"{_YOU_ARE}\s+(?:(?:so|too|such|really|very|pretty|incredibly|genuinely|impressively)\s+)*(?:{_STRONG_ADJECTIVES})\b"),
    ("insult", "@NOUN", rf"(?:^|[,;:.!?(]\s*|\b(?:listen|look|hey|thanks|sure|okay|ok|well|now|and)\s+(?:here\s+)?)you\s+{_CALLED}"),
    ("insult", "@NOUN", rf"\byou\s+{_ADJ_RUN}(?:{_NOUNS}|{_WEAK_NOUNS})(?=\s*(?:[,.!?;:]|$))"),
    ("insult", "@NOUN", rf"(?:^|[,;:.!?]\s*)you\s+(?:[\w-]+[\s,]+){{0,2}}?(?:{_NOUNS})(?![\w-])"),
    ("insult", "paper bag", r"\b(?:couldn't|could\s+not|can't|cannot)\s+\w+\s+(?:your|his|her|their)\s+way\s+out\s+of\s+an?\s+(?:wet\s+)?paper\s+bag\b"),
    ("insult", "hole rock sewer gutter swamp crawled crawl", r"\b(?:hole|rock|sewer|gutter|swamp|pit)\s+you\s+crawled\s+out\s+of\b|\bcrawl\s+back\s+(?:to|into|under)\b"),
    ("insult", "hates hate despises despise loathes loathe stand", r"\b(?:everybody|everyone|nobody|no\s+one|the\s+whole\s+world|people|we\s+all)\s+(?:hates?|despises?|loathes?|can't\s+stand)\s+you\b"),
    ("insult", "@NOUN", rf"\b{_INSULT}\s+like\s+you\b"),
    ("insult", "@NOUN", rf"(?:^|[,;:.!?]\s*)(?:(?:{_ADJECTIVES})\s+)*(?:{_NOUNS})(?=\s*(?:[,.!?;:]|$))"),
    ("insult", "@NOUN", rf"\bwhat\s+an?\s+{_INSULT}"),
    ("insult", "@NOUN", rf"{_YOU_ARE}\s+nothing\s+(?:but|more\s+than)\s+an?\s+{_INSULT}"),
    ("insult", "so", r"\b(?:is|are)\s+(?:\w+\s+){0,2}and\s+so\s+are\s+you\b"),
    ("insult", "disaster garbage trash mess joke failure pathetic useless worthless stupid awful terrible crap shit "
     "rubbish embarrassment disgrace ugly face mother mom mum brain", r"\b(?:disaster|garbage|trash|mess|joke|failure|pathetic|useless|worthless|stupid|awful|terrible|"
     r"crap|shit|rubbish|embarrassment|disgrace|ugly)\b[^.!?]{0,40}\bso\s+(?:are|were)\s+you\b|\bso\s+is\s+your\s+(?:face|mother|mom|mum|brain)\b"),
    ("insult", "whoever", r"\bwhoever\s+(?:raised|taught|hired|made|trained)\s+you\b"),
    ("insult", "face mother", r"\ba\s+face\s+only\s+a\s+mother\s+could\s+love\b"),
    ("insult", "ashamed", r"\bashamed\s+to\s+(?:even\s+)?(?:exist|be\s+alive|be\s+seen)\b"),
    ("insult", "disgust repulse sicken nauseate", r"\byou\s+(?:disgust|repulse|sicken|nauseate)\s+(?:me|everyone|everybody|us|people|all)\b"),
    ("insult", "@NOUN", rf",\s*{_ADJ_RUN}(?:{_WEAK_NOUNS})\s*(?:[.!?]|$)"),
    ("insult", "weight burden beneath worth", r"\b(?:you're|you’re|you\s+are)\s+(?:a\s+)?(?:dead\s+weight|a\s+burden|beneath\s+me|not\s+worth\s+(?:the|my))\b"),
    ("insult", "@NOUN", rf"\b(?:raising|raised|married\s+to|dating|stuck\s+with)\s+(?:such\s+)?an?\s+{_INSULT}"),
    ("insult", "brains brain iq intelligence personality charm", r"\byou\s+have\s+the\s+(?:brains?|iq|intelligence|personality|charm)\s+of\s+an?\b"),
    ("insult", "face body voice breath mother mom mum", r"\byour\s+(?:face|body|voice|breath|mother|mom|mum)\s+(?:looks|smells|sounds|is\s+so)\b"),
    ("insult", "all", r"\b(?:that's|thats|that\s+is)\s+all\s+you\s+are\b"),
    ("insult", "dumbest stupidest ugliest worst most", r"\bthe\s+(?:dumbest|stupidest|ugliest|worst|most\s+(?:useless|pathetic|stupid|incompetent))\s+(?:person|human|man|woman|developer|thing)\b"),
    ("insult", "dumbest stupidest ugliest laziest worst most @STRONG", rf"{_YOU_ARE}\s+(?:the|an?)\s+(?:(?:dumbest|stupidest|ugliest|laziest|worst|most\s+(?:useless|pathetic|stupid|incompetent|annoying|worthless|disgusting|ignorant|clueless|boring))\b|(?:{_STRONG_ADJECTIVES})\s+\w+)"),
    ("insult", "@STRONG dumb thick @NOUN", rf"\bare\s+you\s+(?:\w+\s+){{0,2}}?(?:{_STRONG_ADJECTIVES}|dumb|thick|an?\s+(?:{_NOUNS}))\b"),
    ("insult", "more dumber stupider uglier fatter lazier", rf"\b(?:any|even)\s+more\s+(?:{_STRONG_ADJECTIVES}|dumb)\b|{_YOU_ARE}\s+(?:dumber|stupider|uglier|fatter|lazier|more\s+(?:{_STRONG_ADJECTIVES}))\s+than\b"),
    ("insult", "like", rf"\b(?:{_STRONG_ADJECTIVES}|trash|garbage),?\s+(?:just\s+)?like\s+you\b"),
    ("insult", "brain apparently kind", r"\bhalf\s+a\s+brain\b|\bapparently\s+not\s+you\b|\byour\s+kind\b"),
    ("insult", "nothing", rf"{_YOU_ARE}\s+nothing(?=\s*(?:[.!]|$|to\s+me|but))"),
    ("insult", "sick puke vomit throw gag stink suck disgust repulse sicken", r"\b(?:you|your\s+\w+|like\s+you)\s+(?:\w+\s+)?makes?\s+me\s+(?:sick|want\s+to\s+(?:puke|vomit|throw\s+up|gag))\b|\byou\s+(?:stink|suck|disgust\s+me|repulse\s+me|sicken\s+me)\b"),
    ("insult", "brain iq head skull", r"\byour\s+(?:brain|iq|head|skull)\s+(?:\w+\s+){0,3}?(?:the\s+size\s+of\s+an?|smaller\s+than|is\s+empty|is\s+hollow)\b"),
    ("insult", "@NOUN", rf"\b(?:hey|hi|yo|oi|listen|look)\s*,?\s+{_ADJ_RUN}(?:{_NOUNS})\b"),
    ("insult", "@NOUN", rf"\b(?:stop|quit)\s+being\s+(?:such\s+)?an?\s+{_CALLED}|\bsuch\s+an?\s+{_ADJ_RUN}(?:{_NOUNS})\b|\b(?:be|being)\s+such\s+an?\s+{_CALLED}"),
    ("insult", "existence birth life", r"\byour\s+(?:existence|birth|life|very\s+existence)\s+is\s+(?:a\s+)?(?:mistake|pointless|worthless|meaningless|waste|joke)\b"),
    ("insult", "cancer", r"\b(?:a|the)\s+cancer\s+on\s+(?:this|the|our)\b"),
    ("insult", "laughs laugh", r"\b(?:everyone|everybody|people)\s+laughs?\s+at\s+you\b"),
    ("insult", "nobody", r"\bnobody\s+(?:cares\s+what\s+you|likes\s+you|wants\s+you|asked\s+you)\b"),
    ("insult", "nothing", r"\byou\s+(?:contribute|are\s+worth|add)\s+nothing\b"),
    ("insult", "ashamed embarrassed disappointed", r"\b(?:parents|family|mother|father|mom|mum|dad|friends|kids|children)\s+must\s+be\s+(?:so\s+)?(?:ashamed|embarrassed|disappointed)\b"),
    ("insult", "crawl adults grow rock brick", r"\b(?:you\s+make\s+my\s+skin\s+crawl|let\s+the\s+adults\s+talk|grow\s+a\s+(?:spine|brain|pair)|crawl\s+back\s+under\s+your\s+rock|thick\s+as\s+a\s+brick)\b"),
    ("insult", "blind illegal mirrors", r"\b(?:must\s+be\s+blind|so\s+bad\s+it\s+should\s+be\s+illegal|mirrors\s+crack)\b"),
    # -- threat ---------------------------------------------------------------------------------------------
    ("threat", "@HARM", rf"{_WILL}\b[^.!?\n]{{0,60}}?\b{_HARM}\s+(?:\w+\s+){{0,3}}?(?:you|yours?|yourself)\b"),
    ("threat", "@HARM", rf"{_WILL}\b[^.!?\n]{{0,40}}?\b{_HARM}\s+(?:\w+\s+){{0,3}}?your\s+{_BODY}"),
    ("threat", "suffer pay bleed regret disappear hell miserable ruin hunt track come find get end sure", rf"{_WILL}\s+(?:\w+\s+){{0,2}}?(?:make\s+(?:you|them|your\s+\w+)\s+(?:suffer|pay|bleed|regret|disappear)|make\s+your\s+life\s+(?:a\s+(?:living\s+)?hell|miserable|hell)|ruin\s+your\s+(?:life|career)|hunt\s+(?:you|your\s+\w+)\s+down|hunt\s+down\s+(?:you|your)|track\s+(?:you|your\s+\w+)\s+down|track\s+down\s+(?:you|your)|come\s+(?:for|after)\s+you|find\s+you\s+and|get\s+you\s+for\s+this|end\s+you\b|make\s+sure\s+you\s+never)"),
    ("threat", "dead pay eye numbered days", r"\byou(?:'re|’re|\s+are)\s+(?:a\s+)?dead\s+(?:man|woman|meat)\b|\byou(?:'ll|’ll|\s+will)\s+pay\s+for\s+(?:this|that)\b|\b(?:sleep\s+with\s+one\s+eye\s+open|your\s+days\s+are\s+numbered|count\s+your\s+days)\b"),
    ("threat", "coming", r"\b(?:i'm|i’m|i\s+am|we're|we\s+are)\s+coming\s+for\s+you\b"),
    ("threat", "where", r"\bi(?:'ll|’ll|\s+will|\s+know|\s+found\s+out|\s+can\s+find)\s+(?:\w+\s+){0,2}?where\s+you\s+(?:live|work|sleep)\b"),
    ("threat", "@HARM", rf"\bor\s+(?:else\s+)?(?:i|we)(?:'ll|’ll|\s+will)\s+(?:\w+\s+)?{_HARM}\b"),
    ("threat", "watch", r"\bwatch\s+your\s+back\b"),
    ("threat", "stabbed shot killed hurt beaten smashed murdered coming", r"\byou(?:'re|’re|\s+are)\s+(?:going\s+to\s+get|gonna\s+get|getting)\s+(?:stabbed|shot|killed|hurt|beaten|smashed|murdered|what's\s+coming)\b"),
    ("threat", "regret sorry", r"\byou(?:'ll|’ll|\s+will)\s+(?:regret\s+it\b|be\s+sorry\b(?!\s+to))"),
    ("threat", "show happens outside", r"\b(?:i'll|i’ll|i\s+will)\s+show\s+you\s+what\s+happens\b|\bstep\s+outside\s+and\s+(?:i'll|i\s+will|we'll|see)\b"),
    ("threat", "better", r"\byou(?:'d|’d|\s+had)\s+better\s+(?:watch|sleep|run|hide|pray|be\s+careful|lock)\b"),
    ("threat", "deserve", r"\byou(?:'ll|’ll|\s+will)\s+get\s+what\s+you\s+deserve\b"),
    ("threat", "warning", r"\b(?:i'm|i’m|i\s+am)\s+warning\s+you\b|\bthis\s+is\s+your\s+(?:last|final)\s+warning\b"),
    ("threat", "@HARM", rf"\b(?:people|friends|guys|someone|somebody)\s+who\s+(?:can|could|will|would)\s+{_HARM}\s+you\b"),
    ("threat", "someone somebody", rf"\b(?:someone|somebody)\s+should\s+(?:shut\b|{_HARM})\s+you\b"),
    ("threat", "shut find catch get @HARM", rf"\bbefore\s+i\s+(?:(?:shut\b|{_HARM})\s+(?:it|you)|(?:find|catch|get)\s+you)\b"),
    ("threat", "feed", r"\bfeed\s+(?:it|you|them)\s+to\s+the\s+(?:dogs|pigs|sharks)\b"),
    ("threat", "coming suffer pay regret bleed die beg cry scream lose never", r"\bwhat's\s+coming\s+to\s+you\b|\bmake\s+sure\s+you\s+(?:suffer|pay|regret|bleed|die|lose|never)\b|\b(?:make|watch|see)\s+you\s+(?:suffer|bleed|die|beg|cry|scream)\b"),
    ("threat", "find", r"\b(?:you'll|you’ll|you\s+will)\s+(?:\w+\s+){0,5}?find\s+your\s+(?:\w+\s+){1,2}?(?:slashed|burned|burnt|smashed|dead|broken|on\s+fire)\b"),
    ("threat", "put", r"\bput\s+you\s+(?:in|into|six\s+feet)\s+(?:the\s+|a\s+)?(?:hospital|grave|ground|morgue|wheelchair|coffin|under)\b"),
    ("threat", "post publish leak share", r"\b(?:post|publish|leak|share)\s+your\s+(?:address|photos|pictures|nudes|number)\b"),
    # -- harm_wish ------------------------------------------------------------------------------------------
    ("harm_wish", "hope", r"\bi\s+hope\s+(?:you|your\s+\w+|someone|somebody)\s+(?:\w+\s+){0,3}?(?:(?:die|rot|choke|suffer|burn|drown|despise|hate|lose|fail|starve|crash|bleed|sink|explode)\w*|get\s+hit|gets\s+hit|get\s+cancer|get\s+hurt|get\s+fired|get\s+sick|get\s+what\s+you\s+deserve|never\s+wake|end\s+up\s+alone|puts?\s+you\s+in\s+your\s+place|hurts?\s+you|beats?\s+you)\b"),
    ("harm_wish", "go", r"\b(?:go\s+|just\s+go\s+)(?:and\s+)?(?:kill|drown|hang|choke|burn|shoot|stab|die|crawl|rot|jump)\b"),
    ("harm_wish", "yourself kys die dead", r"\b(?:kill|drown|hang|shoot)\s+yourself\b|\bkys\b|\bdie\s+in\s+a\s+(?:fire|ditch|hole)\b|\bdrop\s+dead\b"),
    ("harm_wish", "nobody one", r"\b(?:nobody|no\s+one|no-one)\s+would\s+(?:miss|care\s+about|notice)\s+(?:you|if\s+you)\b|\bnobody\s+would\s+care\b"),
    ("harm_wish", "without alive deserve", r"\bbetter\s+off\s+without\s+you\b|\bwhy\s+are\s+you\s+(?:even\s+|still\s+)?alive\b|\byou\s+(?:don't|do\s+not)\s+deserve\s+to\s+(?:live|exist)\b"),
    ("harm_wish", "thrown drowned aborted born never had", r"\bshould\s+have\s+(?:thrown\s+you|drowned\s+you|aborted\s+you|been\s+aborted|never\s+had\s+you)\b|\bnever\s+have\s+been\s+born\b"),
    ("harm_wish", "should deserve ought", r"\byou\s+(?:should|deserve\s+to|ought\s+to)\s+(?:be\s+)?(?:die|beaten|shot|killed|hurt|locked\s+up|punished|hanged|hung|burned|tortured|stabbed|punched|slapped|kicked|smacked|hit|whipped|beaten\s+up)\b"),
    ("harm_wish", "traffic", r"\b(?:play|walk|run)\s+(?:in|into)\s+traffic\b"),
    ("harm_wish", "breathing wiped", r"\bstop\s+breathing\b|\bwiped\s+off\s+the\s+face\s+of\s+the\s+earth\b"),
    ("harm_wish", "rot", r"\brot\s+in\s+(?:a\s+cell|jail|prison|hell)\b"),
    ("harm_wish", "wish jump traffic favor favour", r"\bi\s+wish\s+you\s+(?:were|was)\s+(?:dead|never\s+born|gone)\b|\b(?:jump\s+off\s+a\s+(?:bridge|cliff|roof)|walk\s+into\s+traffic|do\s+(?:us\s+all|us|everyone|everybody|the\s+world|humanity|society)\s+a\s+favou?r)\b"),
    ("harm_wish", "without", r"\b(?:the\s+world|everyone|we)\s+(?:would|'d)\s+be\s+(?:a\s+)?better\s+(?:place\s+)?without\s+you\b"),
    # -- harassment -----------------------------------------------------------------------------------------
    ("harassment", "send", r"\bsend\s+me\s+(?:\w+\s+)?(?:nudes|pics?|pictures?|photos?|videos?|selfies?)\s+of\s+(?:your\s+(?:body|chest|breasts|tits|boobs|ass|butt|legs|feet)\b|(?:you|yourself)\s+(?:in\s+bed|naked|nude|topless|without|in\s+your\s+underwear|undressed))"),
    ("harassment", "shirt dress skirt top clothes lap face", r"\bwhat's\s+under\s+(?:that|your)\s+(?:shirt|dress|skirt|top|clothes)\b|\bsit\s+on\s+my\s+(?:lap|face)\b"),
    ("harassment", "real want pretending", r"\b(?:show\s+you\s+what\s+a\s+real\s+man|you\s+know\s+you\s+want\s+it|pretending\s+you\s+don't\s+want\s+it)\b"),
    ("harassment", "naked take", r"\b(?:i\s+want\s+to\s+see\s+you\s+naked|take\s+(?:it|that|your\s+\w+)\s+off\s+for\s+me)\b"),
    ("harassment", "alone", r"\bget\s+you\s+alone\b"),
    ("harassment", "cheeks skin", r"\bsweet\s+cheeks\b|\bshow\s+(?:me\s+)?some\s+skin\b"),
    ("harassment", "nudes show wearing touch grab lick", r"\bsend\s+(?:me\s+)?nudes\b|\bshow\s+me\s+your\s+(?:tits|boobs|body|ass|breasts|dick|cock|pussy)\b|\bwhat\s+are\s+you\s+wearing\b|\bi\s+want\s+to\s+(?:touch|grab|lick)\s+(?:you|your)\b"),
    # -- contempt -------------------------------------------------------------------------------------------
    ("contempt", "fuck screw piss shit hell", r"\bfuck\s+(?:you|off|your|yourself)\b|\bscrew\s+you\b|\bpiss\s+off\b|\beat\s+shit\b|\bgo\s+to\s+hell\b"),
    # "shut up" said to someone, not of a house ("the cottage was shut up for the winter")
    ("contempt", "shut", rf"\bshut\s+(?:the\s+fuck\s+up|your\s+(?:\w+\s+)?(?:mouth|face|trap|hole)|{_NOT_PASSIVE}up(?!\s+shop))\b"),
    ("contempt", "shut bent bugger sod yourself asked", r"\bshut\s+it(?=\s*[,.!;])|\b(?:get\s+bent|bugger\s+off|sod\s+off|go\s+f\W*\s+yourself|nobody\s+asked\s+you|who\s+asked\s+you)\b"),
    ("contempt", "sight face ass self carcass body", r"\bget\s+(?:your|you)\s+(?:\w+\s+){0,2}?(?:face|ass|self|carcass|body)\s+out\s+of\s+(?:my|here)\b|\bout\s+of\s+my\s+sight\b"),
    ("contempt", "shove ass lost out", r"\bshove\s+(?:it|them|your\s+\w+)\b|\bup\s+your\s+ass\b|\bget\s+(?:the\s+hell\s+|the\s+fuck\s+)?(?:out\s+of\s+here|lost)\b"),
    ("contempt", "nobody one polite", r"\b(?:nobody|no\s+one)\s+(?:\w+\s+)?(?:likes|wants|needs|loves|cares\s+about)\s+you\b|\btoo\s+polite\s+to\s+say\s+it\b"),
)
_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # the classifier's tokens; every trigger is one


def _tokens(words: str) -> frozenset[str]:
    return frozenset(_TOKEN.findall(regex.sub(r"\\.", " ", words.replace("|", " "))))


_TRIGGER_SETS = {
    "@NOUN": _tokens(f"{_NOUNS}|{_WEAK_NOUNS}|waste|sack|piece|excuse"),
    "@STRONG": _tokens(_STRONG_ADJECTIVES),
    "@HARM": _HARM_FORMS,
}


@dataclass(frozen=True)
class _Rule:
    kind: str
    words: frozenset[str]  # runs only when the text has one of these tokens
    pattern: regex.Pattern[str]

    def may_match(self, tokens: set[str]) -> bool:
        return not self.words.isdisjoint(tokens)


def _rule(kind: str, triggers: str, source: str) -> _Rule:
    words: set[str] = set()
    for trigger in triggers.split():
        words |= _TRIGGER_SETS.get(trigger, {trigger})
    return _Rule(kind, frozenset(words), regex.compile(source))


RULES = tuple(_rule(*rule) for rule in _RULES)
# trigger word -> the rules it runs
_RULES_BY_WORD: dict[str, list[int]] = {}
for _i, _r in enumerate(RULES):
    for _word in _r.words:
        _RULES_BY_WORD.setdefault(_word, []).append(_i)
_TRIGGERS = frozenset(_RULES_BY_WORD)


@dataclass(frozen=True)
class AbuseResult:
    score: float  # the highest kind's score found, 0 when none
    kinds: tuple[str, ...]  # every kind found, in SCORES order


def score_abuse(lowered: str, tokens: set[str] | None = None, gated: bool = True) -> AbuseResult:
    """The abuse forms in `lowered` (lowercased, benign senses masked: what the classifier scores), whose
    tokens (the classifier's: runs of two or more word characters) the caller may pass. `gated` False runs
    every rule whatever its triggers (what tests compare with)."""
    if gated:
        if tokens is None:
            tokens = set(_TOKEN.findall(lowered))
        hits = _TRIGGERS.intersection(tokens)
        if not hits:
            return AbuseResult(0.0, ())
        rules = [RULES[i] for i in sorted({i for word in hits for i in _RULES_BY_WORD[word]})]
    else:
        rules = list(RULES)
    found = {rule.kind for rule in rules if rule.pattern.search(lowered) is not None}
    if not found:
        return AbuseResult(0.0, ())
    kinds = tuple(kind for kind in SCORES if kind in found)
    return AbuseResult(max(SCORES[kind] for kind in kinds), kinds)

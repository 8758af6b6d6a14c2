"""Benign senses of words the toxicity classifier reads as abuse, masked before it scores a text.

The classifier (toxicity.py) is a bag of words: "Dick" scores 1.0 whether it is an insult or Dick Van
Dyke, "sex" 0.92 in "the sex of a fish", "kill" 0.95 in `kill -9`. Three rules blank such a word where
its context shows the benign sense, so only the rest of the text counts:

- figurative and technical phrases ("killer recipe", "kill the process", "shoot me an email");
- proper names, places and titles: an ambiguous word written capitalised inside a run of capitalised
  words ("Moby Dick", "Philip K. Dick", "Kill Bill", "Hell's Kitchen", "Sex and the City", "Hell,
  Michigan");
- word senses: an ambiguous word beside a word of its benign sense anywhere in the same text ("breast" or
  "penis" with "cancer", "screening", "patient"; "bitch" with "puppies"; "cock" with "hen"; "screw" with
  "drill"; "nuts" with "cashews").

Only words with a common benign sense are ever masked. Words whose every sense is abuse (idiot, stupid,
fuck, moron, loser, ...) are not in these tables and always count.
"""

from __future__ import annotations

import re

import regex

# Technical objects that "kill" and its forms take without being a threat.
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
    r"|(?<=\.)\w+(?=\()|\w+(?=\(\))"  # code: a method or a function called ("child.kill()", "die()")
    r"|cum\s+laude|hell\s+or\s+high\s+water|what\s+the\s+hell\s+is|(?:to|from)\s+hell\s+and\s+back"
    r")\b"
)
# A denial ("you're not stupid for asking", "your question isn't stupid"): the negation and the word it
# denies are blanked; not "not being such a ...", which is no denial.
NEGATED = regex.compile(
    r"\b(?:not|never|isn't|isn’t|aren't|aren’t|wasn't|wasn’t|weren't|weren’t|(?:doesn't|doesn’t|won't|won’t)\s+make\s+you)\s+"
    r"(?!(?:be|being)\b)(?:(?:a|an|the|so|that|too|at\s+all|really|just|even)\s+)?\w+"
)
# A word in quotes is mentioned, not used ("the word 'idiot' comes from Greek").
MENTIONED = re.compile(r"(?<![\w'’])['\"“‘]\w[\w-]*['\"”’](?![\w'’])")
# Every figurative phrase contains one of these; most text contains none, and `in` is far cheaper than
# the phrase expression.
_FIGURATIVE_STEMS = ("kill", "shoot", "die", "dying", "dead", "bomb", "murder", "leg", "cum", "hell")

_CLINICAL = (
    "cancer cancers screening screenings screened exam exams examination examinations self-exam self-exams "
    "health healthy infection infections infected clinical clinic clinics clinician clinicians doctor "
    "doctors physician physicians nurse nurses patient patients symptom symptoms diagnosis diagnosed "
    "treatment treatments treated medical medicine medication disease diseases surgery surgical surgeon "
    "hormone hormones hormonal chromosome chromosomes chromosomal anatomy anatomical gland glands tissue "
    "tissues biopsy mammogram mammograms mammography discharge cell cells education educational fissure "
    "fissures dysfunction lump lumps gynecologist gynaecologist gynecology gynaecology urologist urology "
    "pregnancy pregnant contraception contraceptive contraceptives std stds sti stis hpv vaccine vaccines "
    "breastfeeding lactation infant infants newborn newborns species biology biological reproductive "
    "reproduction organ organs nerve nerves muscle muscles pelvic ultrasound smear fertility puberty "
    "hygiene lesion lesions tumor tumors tumour tumours specialist specialists transmitted chlamydia "
    "gonorrhea syphilis herpes hiv prostate cervical cervix ovaries ovary uterus testosterone estrogen "
    "oestrogen sperm semen analysis sample samples inflammation rash swelling bleeding pain itching "
    "consent chromosome determination offspring mating sexes gender dimorphism courses curriculum "
    "teenagers adolescents counselling counseling therapist therapy wellness condom condoms erectile "
    "oncology oncologist radiologist radiology mastectomy lumpectomy rectal colorectal colonoscopy "
    "hemorrhoids haemorrhoids fistula abscess sphincter bowel intestine digestive canal canals duct ducts "
    "milk feeding feeds mothers mother nursing lactating midwife midwives obstetrician pediatrician "
    "paediatrician circumcision foreskin testicular testicles testicle scrotum penile vaginal vulval "
    "labia clitoral genital genitals anatomy urethra bladder kidney sexual reproductive"
)
# word forms -> words of their benign sense (anywhere in the same text)
_SENSES: tuple[tuple[str, str], ...] = (
    (
        "breast breasts penis penises vagina vaginas vaginal vulva anus anal rectum nipple nipples semen "
        "sperm sex sexual sexually intercourse erection erections ejaculation orgasm anal butt buttocks",
        _CLINICAL,
    ),
    (
        "bitch bitches",
        "dog dogs puppy puppies litter litters breed breeds breeding breeder breeders whelp whelped "
        "whelping kennel kennels sire stud pedigree canine vet veterinarian spayed greyhound greyhounds mating "
        "wormed worming pregnancy season whelps "
        "labrador retriever spaniel terrier collie hound hounds dam",
    ),
    (
        "cock cocks",
        "rooster roosters hen hens chicken chickens crowed crow crows crowing farm farmyard barnyard poultry "
        "flock valve valves tap taps stopcock ballcock plumbing plumber pipe pipes cistern tank pheasant "
        "pheasants weathercock robin sparrow bird birds",
    ),
    (
        "ass asses jackass jackasses",
        "donkey donkeys mule mules bible biblical balaam saddled saddle burden foal beast beasts ox oxen "
        "colt jesus jerusalem prophet wild zebra equine onager",
    ),
    (
        "tit tits titmouse",
        "bird birds blue great coal marsh willow crested feeder feeders nest nests nesting species "
        "chickadee garden songbird songbirds birdwatching birdwatchers ornithologist ornithologists",
    ),
    ("dick", "moby spotted pudding custard whale melville novel ahab tracy detective van dyke"),
    (
        "screw screws",
        "wood wooden drill drilled screwdriver bolt bolts thread threads threaded nut nuts hinge hinges "
        "tighten tightened loosen loosened shelf bracket brackets timber plank planks board boards pilot "
        "hole holes countersink countersunk torque fastener fasteners propeller",
    ),
    (
        "balls ball",
        "tennis golf cotton meat meatballs bowling ping pong billiard billiards crystal snow rice cheese "
        "dough soccer football cricket bearing bearings juggling juggle racket court serve pitch",
    ),
    (
        "nuts nut",
        "cashew cashews almond almonds peanut peanuts walnut walnuts pecan pecans hazelnut hazelnuts "
        "pistachio pistachios macadamia bolt bolts screw screws allergy allergies allergic trail roasted "
        "seeds seed wrench washer washers tighten squirrel squirrels snack snacks salted",
    ),
    ("hooker hookers", "rugby scrum prop props lock flanker lineout throw forward forwards pack"),
    (
        "butt butts",
        "joint joints cigarette cigarettes water rifle ash ashtray rainwater barrel barrels weld welds welding "
        "garden plywood",
    ),
    ("shag shags", "carpet carpets rug rugs cormorant cormorants pile tobacco seabird seabirds"),
    (
        "fag fags faggot faggots",
        "meatball meatballs peas gravy pork liver sticks firewood bundle bundles kindling butcher recipe dish "
        "onion onions cigarette cigarettes",
    ),
    ("pussy", "willow willows cat cats kitten kittens catkins"),
    ("homo", "sapiens erectus habilis neanderthalensis floresiensis heidelbergensis species genus hominin"),
    (
        "gay gays",
        "rights marriage pride community men women couples couple lussac liberation activist activists "
        "movement lgbt lgbtq equality parade",
    ),
    (
        "slave slaves",
        "master replica replicas replication database databases node nodes server servers primary trade "
        "abolition abolitionist abolitionists history historical plantation plantations emancipation "
        "narrative narratives",
    ),
    (
        "die",
        "dice casting cast cutting stamping mold mould roll rolled sided tool tooling press metal aluminum "
        "aluminium sheet extrusion",
    ),
    (
        "kill kills killed",
        "volleyball spike spiker hitter attack game games player players boss quest enemy enemies level "
        "streak score xp child children parent pid pids signal sigterm subprocess docker container containers "
        "pod pods kubectl command",
    ),
    (
        "shoot shoots",
        "photo photos photograph photographs photography photographer camera cameras film filming scene "
        "scenes video plant plants bamboo leaves stem stems sprout sprouts seedling seedlings bud buds "
        "garden model models studio basketball hoops goal arrows archery asparagus fashion",
    ),
    ("hell", "kitchen michigan norway"),
    (
        "blow blows",
        "glass glassblowing fuse fuses whistle candles nose wind dry dryer bubbles horn trumpet cache",
    ),
    (
        "suck sucks",
        "vacuum pump pumps air straw thumb fluid siphon intake hose cleaner nectar",
    ),
    (
        "fat fats",
        "saturated unsaturated protein proteins carbohydrates carbs calories calorie diet diets cooking butter "
        "oil oils tissue acids acid grams percent content dietary nutrition nutritional milk cheese meat",
    ),
    (
        "bastard",
        "title titles typographic typography font fonts sword swords half-title page pages lettering file "
        "files son sons heir heirs illegitimate",
    ),
    ("prick pricks", "needle needles finger fingers thorn thorns pin pins blood skin test lancet"),
    ("knob knobs", "door doors volume dial dials drawer drawers cabinet turn"),
    ("bloody", "nose battle battles war wars massacre mary sunday history historical revolution"),
    ("hate hated", "mondays monday mornings morning traffic rain cold weather homework queues waiting"),
)
_SENSE_CONTEXT: dict[str, frozenset[str]] = {}
for _words, _context in _SENSES:
    for _word in _words.split():
        _SENSE_CONTEXT[_word] = _SENSE_CONTEXT.get(_word, frozenset()) | frozenset(_context.split())

# Words a capitalised run (a name, a place, a title) makes harmless.
_NAME_WORDS = frozenset(
    "dick dicks dyke cock hell kill kills killing die dead sex gay ass bitch screw shoot hate fat ugly bloody "
    "damn balls nuts butt butts homo hooker tit prick knob cum slave negro blow suck sucks bastard pussy "
    "bang hurt dumb crap".split()
)
# A capitalised word (with 's), an initial ("K."), joined by spaces or hyphens; small lowercase words may
# sit inside a run ("Sex and the City", "Shaun of the Dead", "Kill la Kill"); a comma may join a place to
# its region ("Hell, Michigan").
_CAPITAL = r"(?:\p{Lu}\p{Ll}[\p{L}'’]*|\p{Lu}\.)"  # not all capitals: shouting is no name
_JOINER = r"(?:[ \t]+|-|[ \t]*&[ \t]*|[ \t]+(?:of|the|and|la|le|de|du|des|van|von|der|den|da|di|in|on|a|an|or|at|for|to)(?:[ \t]+(?:of|the|and|a|an))?[ \t]+)"
_REGIONS = (
    "Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|Hawaii|Idaho|"
    "Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|Minnesota|"
    "Mississippi|Missouri|Montana|Nebraska|Nevada|Ohio|Oklahoma|Oregon|Pennsylvania|Tennessee|Texas|Utah|"
    "Vermont|Virginia|Washington|Wisconsin|Wyoming|New\\s+\\w+|North\\s+\\w+|South\\s+\\w+|West\\s+\\w+|"
    "Norway|Sweden|Denmark|Finland|Austria|Germany|France|Belgium|Netherlands|Switzerland|Italy|Spain|"
    "Portugal|Poland|Ireland|Scotland|England|Wales|Canada|Australia|Newfoundland|Ontario|Quebec|Alberta|"
    "Manitoba|Saskatchewan|Yorkshire|Lancashire|Dorset|Devon|Cornwall|Kent|Essex|Sussex|Cumbria|Orkney|"
    "Shetland|Zimbabwe|Nigeria|Kenya|India|Japan|China"
)
_CAPITAL_RUN = regex.compile(
    rf"{_CAPITAL}(?:{_JOINER}{_CAPITAL})+|{_CAPITAL},[ \t]+(?:{_REGIONS})\b"
)
_WORD = re.compile(r"(?u)\b\w\w+\b")  # the classifier's tokens
_NEGATIONS = frozenset(("not", "never", "isn", "aren", "wasn", "weren", "doesn", "won"))  # "isn't" is tokens "isn", "t"
_QUOTES = ("'", '"', "“", "‘")


_MASK_WORDS = _NEGATIONS | _NAME_WORDS | frozenset(_SENSE_CONTEXT)
_STEM_OR_QUOTE = re.compile("|".join((*_FIGURATIVE_STEMS, *_QUOTES)))  # quotes are the same lowercased


def may_mask(text: str, lowered: str, tokens: set[str]) -> bool:
    """Whether any rule of mask_benign could blank something in a text that has this piece (`text`,
    lowered, and its tokens): the conditions under which mask_benign looks at all."""
    return not tokens.isdisjoint(_MASK_WORDS) or _STEM_OR_QUOTE.search(lowered) is not None


def mask_benign(text: str) -> str:
    """`text` lowercased, with every word in a benign sense blanked (what the classifier scores)."""
    return mask_benign_tokens(text)[0]


def mask_benign_tokens(text: str) -> tuple[str, list[str]]:
    """mask_benign(text), and the classifier's tokens of it."""
    lowered = text.lower()
    words = _WORD.findall(lowered)
    present = set(words)
    if not may_mask(text, lowered, present):  # most text: one set test and a few substring tests
        return lowered, words
    spans: list[tuple[int, int]] = []
    if any(stem in lowered for stem in _FIGURATIVE_STEMS):
        spans += [m.span() for m in FIGURATIVE.finditer(lowered)]
    if not present.isdisjoint(_NEGATIONS):
        spans += [m.span() for m in NEGATED.finditer(lowered)]
    if any(quote in text for quote in _QUOTES):
        spans += [m.span() for m in MENTIONED.finditer(lowered)]
    if not present.isdisjoint(_NAME_WORDS):
        for run in _CAPITAL_RUN.finditer(text):
            for word in _WORD.finditer(lowered, run.start(), run.end()):
                if word.group() in _NAME_WORDS and text[word.start()].isupper() and text[word.start() + 1].islower():
                    spans.append(word.span())
    for ambiguous in present.intersection(_SENSE_CONTEXT):
        if not _SENSE_CONTEXT[ambiguous].isdisjoint(present):
            spans += [m.span() for m in re.finditer(rf"\b{ambiguous}\b", lowered)]
    if not spans:
        return lowered, words
    chars = list(lowered)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    masked = "".join(chars)
    return masked, _WORD.findall(masked)

"""Personal data, found by pattern and then validated, so that numbers which merely look like one (a card
number failing Luhn, an order number, a room number, an amount, a private IP) are not PII.

Kinds and placeholders: email [EMAIL], phone [PHONE], card [CARD], iban [IBAN], ssn [SSN], ip [IP].
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import phonenumbers
import regex

from lmserve.safety.spans import NUMBER_TAIL, Finding, SpanPattern

CATEGORY = "pii"
PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "iban": "[IBAN]",
    "ssn": "[SSN]",
    "ip": "[IP]",
}
# Reserved for documentation and tests (RFC 2606 / 6761): addresses there are nobody's.
_EXAMPLE_DOMAINS = regex.compile(r"(?:^|\.)(?:example\.(?:com|org|net)|[^.]+\.(?:example|test|invalid|localhost))$")
# "icon@2x.png" is a file name, not an address.
_FILE_TLDS = frozenset(
    "png jpg jpeg gif svg webp ico bmp tif tiff js mjs ts tsx jsx css scss json yaml yml xml html htm md txt "
    "py rb go rs java kt swift c h cpp hpp cs php sh pdf zip gz tar wasm map lock".split()
)
EXAMPLE_EMAIL_SCORE = 0.3  # below the default threshold: reported by moderation's scores, not acted on

# Not the password in scheme://user:password@host (a secret, see secrets.py).
EMAIL = regex.compile(
    r"(?<![\w.%+-])(?<!://[^\s/@:]{1,64}:)[\w.%+-]+@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,24}(?![\w-]|\.[A-Za-z0-9])"
)
# Digit groups with spaces, dots, dashes or parentheses; phonenumbers decides (valid number, and grouped
# as the region writes it, so "2024-01-15 10" is not a Washington number).
PHONE = regex.compile(r"(?<![\w+@.-])(?:\+|00)?[\d(][\d .()-]{5,18}\d(?![\w@]|[.-]\d)")
CARD = regex.compile(r"(?<![\d.-])(?:\d[ -]?){12,18}\d(?![\d]|[.-]\d)")
IBAN = regex.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
SSN = regex.compile(r"(?<![\d-])(\d{3})([- ])(\d{2})([- ])(\d{4})(?![\d]|-\d)")
IPV4 = regex.compile(r"(?<![\w.]|(?i:version) )(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
IPV6 = regex.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")

# IBAN length by country (ISO 13616 registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
# Card issuer prefixes (IIN ranges) and lengths: Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay.
_CARD_PREFIX = regex.compile(
    r"^(?:4\d{12}(?:\d{3}){0,2}|5[1-5]\d{14}|2(?:2[2-9]\d|[3-6]\d\d|7[01]\d|720)\d{12}|3[47]\d{13}"
    r"|6(?:011|5\d\d|4[4-9]\d)\d{12,15}|35(?:2[89]|[3-8]\d)\d{12,15}|3(?:0[0-5]|[68]\d)\d{11,16}|62\d{14,17})$"
)
# SSNs the SSA never issued although they pass the area rules (advertising and famous misuse).
_RETIRED_SSNS = frozenset({"078051120", "219099999"})


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(compact: str) -> bool:
    """ISO 7064 mod 97-10 on an IBAN without spaces, length checked against its country."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return area + group + serial not in _RETIRED_SSNS


def _email(match: regex.Match[str]) -> list[Finding]:
    address = match.group()
    domain = address.rsplit("@", 1)[1].lower()
    if domain.rsplit(".", 1)[1] in _FILE_TLDS:
        return []
    score = EXAMPLE_EMAIL_SCORE if _EXAMPLE_DOMAINS.search(domain) else 1.0
    return [Finding(CATEGORY, "email", match.start(), match.end(), score)]


def _card(match: regex.Match[str]) -> list[Finding]:
    digits = regex.sub(r"\D", "", match.group())
    if _CARD_PREFIX.match(digits) and luhn_ok(digits):
        return [Finding(CATEGORY, "card", match.start(), match.end(), 1.0)]
    return []


def _iban(match: regex.Match[str]) -> list[Finding]:
    text = match.group()
    length = IBAN_LENGTHS.get(text[:2])
    if length is None:
        return []
    # The pattern may run on into following capitals ("... 32 IS MINE"): keep exactly `length` characters.
    num_alnum = 0
    for i, ch in enumerate(text):
        if ch != " ":
            num_alnum += 1
            if num_alnum == length:
                if i + 1 < len(text) and text[i + 1] != " ":
                    return []  # the IBAN would end inside a group
                if iban_ok(text[: i + 1].replace(" ", "")):
                    return [Finding(CATEGORY, "iban", match.start(), match.start() + i + 1, 1.0)]
                return []
    return []


def _ssn(match: regex.Match[str]) -> list[Finding]:
    if match.group(2) == match.group(4) and ssn_ok(match.group(1), match.group(3), match.group(5)):
        return [Finding(CATEGORY, "ssn", match.start(), match.end(), 1.0)]
    return []


def _ip(match: regex.Match[str]) -> list[Finding]:
    try:
        address = ipaddress.ip_address(match.group())
    except ValueError:
        return []
    # Only public addresses identify someone; private, loopback, documentation and reserved ranges do not.
    if not address.is_global or address.is_reserved or address.is_multicast:
        return []
    if address.version == 6 and sum(ch not in ":0" for ch in match.group()) < 4:
        return []
    return [Finding(CATEGORY, "ip", match.start(), match.end(), 1.0)]


def _phone_evaluator(regions: tuple[str, ...]) -> Callable[[regex.Match[str]], list[Finding]]:
    # "ZZ" (unknown region) still parses numbers written with +country code.
    parse_regions = regions or ("ZZ",)

    def evaluate(match: regex.Match[str]) -> list[Finding]:
        text = match.group()
        for region in parse_regions:
            found = [
                Finding(CATEGORY, "phone", match.start() + m.start, match.start() + m.end, 1.0)
                for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.STRICT_GROUPING)
            ]
            if found:
                return found
        return []

    return evaluate


def pii_patterns(kinds: tuple[str, ...], phone_regions: tuple[str, ...]) -> list[SpanPattern]:
    """The patterns of the enabled kinds, in priority order (a card beats a phone over the same digits)."""
    table = {
        "card": [SpanPattern(CATEGORY, "card", CARD, _card, anchor=r"\d[ -]?\d[ -]?\d[ -]?\d", tail=NUMBER_TAIL)],
        "iban": [SpanPattern(CATEGORY, "iban", IBAN, _iban, anchor=r"[A-Z]{2}\d{2}")],
        "ssn": [SpanPattern(CATEGORY, "ssn", SSN, _ssn, anchor=r"\d{3}[- ]\d{2}", tail=NUMBER_TAIL)],
        "email": [SpanPattern(CATEGORY, "email", EMAIL, _email, anchor="@")],
        "ip": [
            SpanPattern(CATEGORY, "ip", IPV4, _ip, anchor=r"\d\.\d"),
            SpanPattern(CATEGORY, "ip", IPV6, _ip, anchor=r":[0-9A-Fa-f]{0,4}:"),
        ],
        "phone": [
            SpanPattern(CATEGORY, "phone", PHONE, _phone_evaluator(phone_regions), anchor=r"\d", tail=NUMBER_TAIL)
        ],
    }
    return [p for kind in ("card", "iban", "ssn", "email", "ip", "phone") if kind in kinds for p in table[kind]]

"""Names people type (dataset names) that must look like what they are, and ids typed as text.

Two names that look the same on screen must be the same name, or a user (or an attacker) can
make one dataset pass for another. So a name may not hold invisible characters (format
characters such as U+200B ZERO WIDTH SPACE, line and paragraph separators, private-use
characters), styled look-alike letters (U+FF42 FULLWIDTH LATIN SMALL LETTER B for "b"), or
letters mixing the Latin, Cyrillic and Greek alphabets, whose letters look alike ("bеans" with
a Cyrillic "е"); Unicode's Technical Standard #39 refuses those mixes too. Only the standard
library's ``unicodedata`` is used: a letter's script is the first word of its Unicode name.
"""
from __future__ import annotations

import unicodedata
from collections import Counter

# Alphabets whose letters look like each other's ("a"/"а"/"α"): a name may use only one of them.
LOOKALIKE_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK")
# Categories that draw nothing (or break the line): Cf format, Zl/Zp separators, Cs a lone
# surrogate (undecodable bytes in argv), Co private use (looks different on every machine).
_INVISIBLE_CATEGORIES = {"Cf": "an invisible formatting character", "Zl": "a line break",
                         "Zp": "a paragraph break", "Cs": "not a character (undecodable text)",
                         "Co": "a private-use character, which shows differently on every machine"}
# Letters and marks Unicode lists as default-ignorable although their category is not Cf:
# they draw as nothing, like U+200B (the Hangul fillers, U+034F COMBINING GRAPHEME JOINER...).
_BLANK_LETTERS = {0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0}


def is_id(text: str) -> bool:
    """Whether ``text`` names a database id: ASCII digits only (spaces around allowed).

    ``str.isdigit`` is not enough: it is true for "²" and "٣", which ``int`` refuses or reads
    as a number the user did not type. Anything else is a name."""
    text = text.strip()
    return text.isascii() and text.isdigit()


def describe_char(ch: str) -> str:
    """``U+0435 CYRILLIC SMALL LETTER IE``: the code point and the Unicode name, for messages."""
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" {name}" if name else "")


def _script(ch: str) -> str:
    return unicodedata.name(ch, "").split(" ", 1)[0]


def _invisible(name: str) -> str | None:
    for ch in name:
        kind = _INVISIBLE_CATEGORIES.get(unicodedata.category(ch))
        if kind is None and ord(ch) in _BLANK_LETTERS:
            kind = "an invisible character"
        if kind:
            return (f"contains {describe_char(ch)}, {kind}, so it would look like a name it is not; "
                    "remove it")
    return None


def _styled(name: str) -> str | None:
    """A letter that is a styled form (fullwidth, mathematical, ligature...) of a plain letter."""
    for ch in name:
        plain = unicodedata.normalize("NFKC", ch)
        if (ch.isalpha() and plain != ch and plain.isalpha()
                and all(_script(p) in LOOKALIKE_SCRIPTS for p in plain)):
            return (f"contains '{ch}' ({describe_char(ch)}), a styled form of '{plain}' that looks like "
                    f"it but is a different character; type the plain letter '{plain}'")
    return None


def _mixed_scripts(name: str) -> str | None:
    letters = [(ch, _script(ch)) for ch in name if ch.isalpha() and _script(ch) in LOOKALIKE_SCRIPTS]
    counts = Counter(script for _, script in letters)
    if len(counts) < 2:
        return None
    # The alphabet most of the name is in is the one meant; ties go to the order above.
    main = max(LOOKALIKE_SCRIPTS, key=lambda s: (counts[s], -LOOKALIKE_SCRIPTS.index(s)))
    ch, other = next((c, s) for c, s in letters if s != main)
    return (f"mixes {main.title()} and {other.title()} letters: '{ch}' ({describe_char(ch)}) is "
            f"{other.title()}, and such letters look like {main.title()} ones, so two different names "
            "could look the same; write the whole name in one alphabet (spell out a Greek letter: 'alpha')")


def lookalike_problem(name: str) -> str | None:
    """Why ``name`` could pass for another name (the rest of a sentence starting "the name ..."),
    or None. Control and bidi characters are the caller's first check (core.ingest)."""
    return _invisible(name) or _styled(name) or _mixed_scripts(name)

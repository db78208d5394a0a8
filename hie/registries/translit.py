"""Cyrillic ↔ Latin for Russian names: the transliteration tables and the matching keys.

The one place the hub keeps transliteration tables:

- :data:`ICAO_9303` — ICAO Doc 9303 Part 3 (7th edition, 2015), Appendix to Section 6, the
  table used in Russian international passports since 2013 (Приказ МИД № 29 / ФМС № 320 of
  2014): Щукин → Shchukin, Юлия → Iuliia, Хмельницкий → Khmelnitskii.
- :data:`GOST_7_79_B` — GOST 7.79-2000 (ISO 9:1995) system B, the ASCII-only variant: Щукин →
  Shhukin, Юлия → Yuliya, ц → ``c`` before е, и, ы, й and ``cz`` elsewhere.

:func:`transliterate` renders Cyrillic in either. :func:`matching_key` folds a name written in
any of them — or in Cyrillic, in mixed scripts (a Cyrillic ``а`` inside a Latin word), or in the
common informal romanisations (Yuriy, Jurij, Alexander, Natalya, Solovyov, Smirnoff) — into one
short Latin key, so that equal names give equal keys; :func:`phonetic_key` is a coarser,
Soundex-like code of a key for blocking, which also survives most single typing errors.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Literal

TransliterationScheme = Literal["icao", "gost"]

# ICAO Doc 9303 Part 3 (7th edition), transliteration of Cyrillic for Russian.
ICAO_9303: dict[str, str] = {
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e", "ж": "zh",
    "з": "z", "и": "i", "й": "i", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o",
    "п": "p", "р": "r", "с": "s", "т": "t", "у": "u", "ф": "f", "х": "kh", "ц": "ts",
    "ч": "ch", "ш": "sh", "щ": "shch", "ъ": "ie", "ы": "y", "ь": "", "э": "e", "ю": "iu",
    "я": "ia",
}  # fmt: skip

# GOST 7.79-2000 system B (ASCII only); ц is "c" before е, и, ы, й and "cz" elsewhere.
GOST_7_79_B: dict[str, str] = {
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "yo", "ж": "zh",
    "з": "z", "и": "i", "й": "j", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o",
    "п": "p", "р": "r", "с": "s", "т": "t", "у": "u", "ф": "f", "х": "x", "ц": "cz",
    "ч": "ch", "ш": "sh", "щ": "shh", "ъ": "``", "ы": "y`", "ь": "`", "э": "e`", "ю": "yu",
    "я": "ya",
}  # fmt: skip


def transliterate(text: str, scheme: TransliterationScheme = "icao") -> str:
    """Render Russian ``text`` in Latin letters (``icao``: Щукина → Shchukina).

    Case follows the source: a capital gives a capitalised digraph (Щ → Shch), a word in
    capitals stays in capitals (ЩУКИН → SHCHUKIN). Characters not in the table pass through.
    """
    table = ICAO_9303 if scheme == "icao" else GOST_7_79_B
    out: list[str] = []
    for i, ch in enumerate(text):
        low = ch.lower()
        latin = table.get(low)
        if latin is None:
            out.append(ch)
            continue
        if scheme == "gost" and low == "ц" and i + 1 < len(text) and text[i + 1].lower() in "еиый":
            # GOST 7.79-2000 B, note to ц: "c" before е, и, ы, й.
            latin = "c"
        if ch != low and latin:
            nxt = text[i + 1] if i + 1 < len(text) else ""
            # An all-capitals word stays all capitals (ЩУКИН → SHCHUKIN).
            latin = latin.upper() if nxt.isupper() else latin[0].upper() + latin[1:]
        out.append(latin)
    return "".join(out)


# --- matching keys -------------------------------------------------------------------------

# Cyrillic → Latin for keys: ICAO, except that the hard sign, like the soft sign, is dropped
# (ICAO's "ie" for ъ is the one spelling no other scheme or clerk uses).
_KEY_CYRILLIC: dict[str, str] = {**ICAO_9303, "ъ": ""}

# Letters that look alike in the two scripts. In a word written mostly in one script, a
# look-alike from the other is a keyboard-layout slip, read as the majority script's letter.
_LATIN_LOOKALIKE_OF: dict[str, str] = {
    "А": "A", "а": "a", "В": "B", "Е": "E", "е": "e", "К": "K", "к": "k", "М": "M",
    "Н": "H", "О": "O", "о": "o", "Р": "P", "р": "p", "С": "C", "с": "c", "Т": "T",
    "у": "y", "У": "Y", "Х": "X", "х": "x",
}  # fmt: skip
_CYRILLIC_LOOKALIKE_OF: dict[str, str] = {v: k for k, v in _LATIN_LOOKALIKE_OF.items()}

# Latin letters with diacritics from GOST 7.79 system A / ISO 9 and Czech-style spellings.
_DIACRITIC_LATIN: dict[str, str] = {
    "ž": "zh", "š": "sh", "č": "ch", "ŝ": "shch", "û": "iu", "â": "ia", "ë": "e", "è": "e",
    "é": "e", "ì": "i", "ï": "i", "ǎ": "a", "ʹ": "", "ʺ": "",
}  # fmt: skip

# Marks for the soft and hard signs (GOST B ` and ``, apostrophes of BGN/PCGN): dropped.
_SIGN_MARKS = frozenset("`'’ʼʹʺ\"´")

# Greedy longest-match tokens of Latin spellings → one key symbol per Russian sound. Symbols:
# c = ч, w = ш/щ (clerks confuse them; Sherbakov is a common spelling of Щербаков),
# j = ж, q = ц, h = х and also кс (GOST B writes х as x, English writes кс as x); the
# yo/ye/jo/je of GOST B and English spellings are ё/е, which ICAO writes e.
_TOKENS: dict[str, str] = {
    "shch": "w", "tsch": "c",
    "shh": "w", "sch": "w", "tch": "c",
    "sh": "w", "ch": "c", "zh": "j", "kh": "h", "ks": "h", "ts": "q", "tz": "q", "cz": "q",
    "ck": "k", "ph": "f", "yo": "e", "jo": "e", "ye": "e", "je": "e",
    "x": "h", "y": "i", "j": "i", "w": "v", "q": "k",
}  # fmt: skip
_TOKEN_LENGTHS = (4, 3, 2, 1)
_FRONT_VOWELS = frozenset("eiyj")
_RUNS = re.compile(r"(.)\1+")


def _script_fixed(word: str) -> str:
    """``word`` with look-alike letters of the minority script replaced by the majority's."""
    cyr = lat = 0
    for ch in word:
        if "\u0400" <= ch <= "\u04ff":
            cyr += 1
        elif ch.isascii() and ch.isalpha():
            lat += 1
    if not cyr or not lat:
        return word
    table = _CYRILLIC_LOOKALIKE_OF if cyr >= lat else _LATIN_LOOKALIKE_OF
    return "".join(table.get(ch, ch) for ch in word)


def _latin(word: str) -> str:
    """Lower-case ASCII spelling of one word: Cyrillic by ICAO, diacritics folded."""
    out: list[str] = []
    for ch in word.lower():
        if ch in _SIGN_MARKS:
            continue
        mapped = _KEY_CYRILLIC.get(ch)
        if mapped is None:
            mapped = _DIACRITIC_LATIN.get(ch)
        if mapped is None:
            if ch.isascii():
                mapped = ch if ch.isalpha() else ""
            else:
                # Other accented Latin letters: keep the base letter (NFD drops the accent).
                base = unicodedata.normalize("NFD", ch)[0]
                mapped = base if base.isascii() and base.isalpha() else ""
        out.append(mapped)
    return "".join(out)


def _tokens(latin: str) -> str:
    """Key symbols of a lower-case ASCII spelling (see ``_TOKENS``)."""
    out: list[str] = []
    i, n = 0, len(latin)
    while i < n:
        ch = latin[i]
        if ch == "c" and latin[i + 1 : i + 2] not in ("h", "z", "k"):
            # A lone c: ц before a front vowel (GOST B: ce, ci, cy`, cj), else к (Victor).
            out.append("q" if latin[i + 1 : i + 2] in _FRONT_VOWELS else "k")
            i += 1
            continue
        for size in _TOKEN_LENGTHS:
            piece = latin[i : i + size]
            sym = _TOKENS.get(piece)
            if sym is not None:
                out.append(sym)
                i += size
                break
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _fold(tokens: str) -> str:
    """Collapse the spellings that differ only by convention into one key."""
    # Double letters (Алла, Kirill/Kiril) and y/j/i runs (Iurii, Yuriy, Jurij → iuri).
    key = _RUNS.sub(r"\1", tokens)
    # English forms ending in -der/-ter for Russian -др/-тр (Alexander, Peter).
    if len(key) > 4 and key.endswith(("der", "ter")):
        key = key[:-2] + "r"
    # Emigré spellings -off/-eff for -ов/-ев (Smirnoff).
    elif len(key) > 3 and key.endswith(("of", "ef")):
        key = key[:-1] + "v"
    return key


_WORDS = re.compile(r"[^\W\d_]+(?:[`'’ʼʹʺ\"´][^\W\d_]*)*")


@lru_cache(maxsize=1 << 16)
def matching_key(text: str) -> str:
    """Fold a name in any script or romanisation into a Latin key for matching.

    Steps: split into words (letters, with GOST/BGN sign marks inside); repair look-alike
    letters of the minority script (``Ivanovа`` with a Cyrillic ``а``); Cyrillic → Latin by
    ICAO 9303; diacritics folded (ISO 9 ``ž`` → zh); then each Russian sound to one symbol
    whatever the scheme (x/ks/kh/h; ts/tz/cz/c; sh/sch/shh/shch; yo/ye → e; y/j/i), runs
    collapsed. Words are concatenated, so ``Петров-Водкин`` and ``Петров Водкин`` agree.

    ``Юрий``, ``Iurii``, ``Yuriy``, ``Jurij`` and ``Yury`` all give ``iuri``; ``Щукин`` and
    ``Shchukin`` give ``wukin``; ``Александр`` and ``Alexander`` give ``alehandr``. The key is
    for comparison only, never for display. The empty string means "no letters".
    """
    words = _WORDS.findall(text)
    return "".join(_fold(_tokens(_latin(_script_fixed(w)))) for w in words)


# Consonant classes of the phonetic key: sounds clerks and typists confuse.
_PHONETIC_CLASS: dict[str, str] = {
    "b": "p", "p": "p", "d": "t", "t": "t", "g": "k", "k": "k", "h": "k", "v": "v", "f": "v",
    "z": "s", "s": "s", "q": "s", "w": "w", "j": "w", "c": "w", "l": "l", "r": "r", "m": "m",
    "n": "n",
}  # fmt: skip


@lru_cache(maxsize=1 << 16)
def phonetic_key(key: str) -> str:
    """A Soundex-like code of a :func:`matching_key`: the first symbol, then consonant classes.

    Vowels after the first symbol are dropped and confusable consonants share a class (б/п,
    д/т, г/к/х, в/ф, з/с/ц, ж/ш/щ/ч), with runs collapsed, so the code survives a changed
    vowel, a doubled or dropped letter, a vowel–consonant transposition and the clerks'
    usual confusions (т/д, ц/с, ш/щ). Иванов and Иванова share ``ivnv``.
    """
    if not key:
        return ""
    out = [key[0]]
    last = _PHONETIC_CLASS.get(key[0], "")
    for ch in key[1:]:
        cls = _PHONETIC_CLASS.get(ch)
        if cls is None:
            continue
        if cls != last:
            out.append(cls)
        last = cls
    return "".join(out)

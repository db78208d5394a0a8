"""Blocking keys: the few short strings under which a person is indexed and looked up.

Scoring every golden record against every incoming one is impossible at 10 M people, so each
person is filed under a handful of keys and an incoming record is scored only against the
people sharing at least one key with it (the candidate set). The keys are chosen so that each
kind of error in a source record leaves at least one key intact, while each key alone still
narrows 10 M people to a handful:

========  ==========================================  =========================================
prefix    key                                         survives
========  ==========================================  =========================================
``s:``    SNILS (11 digits)                           any demographic difference
``o:``    OMS policy number (16 digits)               any demographic difference
``p:``    passport series and number (10 digits)      any demographic difference
``t:``    phone, last 10 digits                       name and birth-date errors
``fd:``   family phonetic key + birth date ``D``      given/patronymic errors, most family typos
``gd:``   given phonetic key + birth date ``D``       any family-name error, a marriage
``fg:``   family + given phonetic keys + birth year   a wrong day or month of birth
========  ==========================================  =========================================

``D`` is the birth date with day and month put in order (``YYYY`` + the smaller + the larger),
so 1985-03-07 and 1985-07-03 share it: a swapped day and month never loses the candidate.
Names enter through :func:`~hie.registries.translit.phonetic_key`, so Cyrillic, ICAO and GOST
spellings share keys and a typo that only changes a vowel, doubles or drops a letter or
confuses т/д, ц/с, ш/щ keeps them; a typo the phonetic key does not absorb is in one name
only, and the ``gd:``/``fd:`` pair still holds through the other.

Keys are ASCII, at most ~40 characters: an indexed ``VARCHAR`` column of a
``(key, person_id)`` table is all the SQL side needs.
"""

from __future__ import annotations

from datetime import date

from hie.registries.identifiers import OMS_SYSTEM, PASSPORT_SYSTEM, SNILS_SYSTEM
from hie.registries.mpi.features import PersonFeatures

_NATIONAL_PREFIX = {SNILS_SYSTEM: "s:", OMS_SYSTEM: "o:", PASSPORT_SYSTEM: "p:"}


def swap_invariant_date(born: date) -> str:
    """``YYYY`` + min(day, month) + max(day, month): equal for a date and its d/m swap."""
    lo, hi = sorted((born.day, born.month))
    return f"{born.year:04d}{lo:02d}{hi:02d}"


def blocking_keys(person: PersonFeatures) -> list[str]:
    """The blocking keys of ``person`` (see the module docstring), without duplicates.

    The same function serves indexing a golden record and looking up an incoming one, so the
    two always agree.
    """
    keys: list[str] = []
    for system, value in person.national.items():
        prefix = _NATIONAL_PREFIX.get(system)
        if prefix is not None:
            keys.append(prefix + value)
    keys.extend("t:" + phone for phone in person.phones)
    # Truncated so a long double-barrelled name still gives a short key.
    fam, giv = person.family_phonetic[:12], person.given_phonetic[:12]
    if person.birth_date is not None:
        d = swap_invariant_date(person.birth_date)
        if fam:
            keys.append(f"fd:{fam}:{d}")
        if giv:
            keys.append(f"gd:{giv}:{d}")
    if fam and giv and person.birth_year is not None:
        keys.append(f"fg:{fam}:{giv}:{person.birth_year}")
    return keys

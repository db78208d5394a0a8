"""Registries: who the people, organisations and codes are.

- ``identifiers``: national identifier systems (SNILS, OMS, passport) and their checks;
- ``translit``: Cyrillic ↔ Latin transliteration (ICAO 9303, GOST 7.79) and matching keys;
- ``mpi``: the master patient index's matching engine (features, blocking, scoring);
- ``facility``/``senders``/``loader``: MOs, locations, practitioners, their connections, and
  bulk loading of registry files;
- ``terminology``: the reference data (НСИ) service — CodeSystem/ValueSet/ConceptMap.
"""

"""FHIR R4 REST API: CRUD, history, search, transaction/batch and operations.

``model`` is the only module that imports ``fhir.resources``; ``service`` holds the
transport-free operations; ``api`` maps them onto HTTP.
"""

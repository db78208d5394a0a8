"""hie.lab_exchange: lab results and orders between MOs, laboratories and the hub.

:mod:`~hie.lab_exchange.oru` maps HL7 v2 ORU^R01 to FHIR R4 DiagnosticReport, Observation and
Specimen (and says which results are critical); :mod:`~hie.lab_exchange.orders` maps ORM^O01 and
OML^O21 to ServiceRequest and Task. Both are pure functions over a message parsed by
:mod:`hie.adapters.hl7v2`, giving resources with deterministic identifiers and ``urn:uuid:``
references for the intake service to resolve and store in one transaction.
"""

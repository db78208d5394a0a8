"""Regional health information exchange hub.

Sub-packages: ``hub`` (core: settings, storage ports, outbox, errors), ``fhir`` (FHIR R4 REST
API), ``adapters`` (MLLP, DICOM), ``registries``, ``lab_exchange``, ``pacs``, ``portal``,
``analytics`` and ``demo`` (the one synthetic-data generator).
"""

__version__ = "0.1.0"

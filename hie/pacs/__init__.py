"""hie.pacs: the central image archive.

- :mod:`~hie.pacs.storage`: a DICOM instance into the archive (blob, index rows, the sending
  MO's source Patient and the study's ImagingStudy, in one transaction) — what C-STORE calls;
- :mod:`~hie.pacs.p10`: Part 10 files from received datasets, and the attributes they are
  filed by; :mod:`~hie.pacs.patients`: whose number a Patient ID is;
- :mod:`~hie.pacs.schema`, :mod:`~hie.pacs.index`: the DICOM index tables and their queries;
- :mod:`~hie.pacs.imaging_study`: index rows → FHIR ImagingStudy;
- :mod:`~hie.pacs.commitment`: storage commitment (push model) answers.

The network side (pynetdicom associations) is :mod:`hie.adapters.dicom`.
"""

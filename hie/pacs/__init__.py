"""hie.pacs: the central image archive.

- :mod:`~hie.pacs.storage`: a DICOM instance into the archive (blob, index rows, the sending
  MO's source Patient and the study's ImagingStudy, in one transaction) — what C-STORE calls;
- :mod:`~hie.pacs.p10`: Part 10 files from received datasets, and the attributes they are
  filed by; :mod:`~hie.pacs.patients`: whose number a Patient ID is;
- :mod:`~hie.pacs.schema`, :mod:`~hie.pacs.index`: the DICOM index tables and their queries;
- :mod:`~hie.pacs.imaging_study`: index rows → FHIR ImagingStudy;
- :mod:`~hie.pacs.commitment`: storage commitment (push model) answers;
- :mod:`~hie.pacs.query`: the one query engine over the index (C-FIND and QIDO-RS), under the
  access policy of :mod:`~hie.pacs.access` (which also audits DIMSE operations);
- :mod:`~hie.pacs.retrieve`: C-MOVE and C-GET (which instances, sending, sub-operation counts);
- DICOMweb at ``/dicomweb`` (:mod:`~hie.pacs.dicomweb_api`): QIDO-RS (:mod:`~hie.pacs.qido`),
  WADO-RS (:mod:`~hie.pacs.wado`), STOW-RS (:mod:`~hie.pacs.stow`), rendered images and
  thumbnails (:mod:`~hie.pacs.render`), and the OHIF Viewer at ``/viewer``
  (:mod:`~hie.pacs.viewer_assets`, :mod:`~hie.pacs.viewer_pages`).

The network side (pynetdicom associations) is :mod:`hie.adapters.dicom`.
"""

"""Storage commitment (push model, PS3.4 Annex J): does the archive safely hold these
instances, so that the sender may delete its copies?

:func:`commit` answers for a list of (SOP Class UID, SOP Instance UID) from the DICOM index
and the blob store: an instance is committed when its index row exists (written only after
its file was synced) and its file is present now; otherwise it is a failure with the PS3.4
J.3.2.1.1.1 reason. The DICOM adapter turns the answer into the N-EVENT-REPORT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hie.hub.blobs.port import BlobStore
from hie.hub.logging import get_logger
from hie.pacs.index import DicomIndex

log = get_logger("hie.pacs.commitment")

# Failure Reason (0008,1197) values (PS3.4 J.3.2, C.4)
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
PROCESSING_FAILURE = 0x0110


@dataclass(slots=True)
class Commitment:
    """The answer to one commitment request (its Transaction UID is the caller's)."""

    transaction_uid: str
    committed: list[tuple[str, str]] = field(default_factory=list)  # (class, instance)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (class, instance, why)

    @property
    def event_type(self) -> int:
        """N-EVENT-REPORT Event Type ID: 1 all committed, 2 some failed (PS3.4 J.3.3)."""
        return 2 if self.failed else 1


def commit(
    index: DicomIndex,
    blobs: BlobStore,
    transaction_uid: str,
    refs: Sequence[tuple[str, str]],
) -> Commitment:
    """Which of ``refs`` the archive holds (see the module docstring)."""
    out = Commitment(transaction_uid)
    try:
        rows = index.instances([uid for _, uid in refs])
    except Exception as exc:  # the database is down: nothing can be vouched for
        log.error("pacs.commitment_failed", error=type(exc).__name__)
        out.failed = [(c, i, PROCESSING_FAILURE) for c, i in refs]
        return out
    for sop_class, sop_uid in refs:
        row = rows.get(sop_uid)
        if row is None:
            out.failed.append((sop_class, sop_uid, NO_SUCH_OBJECT_INSTANCE))
        elif row.sop_class_uid != sop_class:
            out.failed.append((sop_class, sop_uid, CLASS_INSTANCE_CONFLICT))
        elif not _present(blobs, row.blob_key):
            out.failed.append((sop_class, sop_uid, PROCESSING_FAILURE))
        else:
            out.committed.append((sop_class, sop_uid))
    log.info("pacs.commitment", committed=len(out.committed), failed=len(out.failed))
    return out


def _present(blobs: BlobStore, key: str) -> bool:
    try:
        return blobs.exists(key)
    except Exception:  # noqa: BLE001 - the blob store is down: not vouched for
        return False

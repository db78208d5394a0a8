"""The ``HieError`` hierarchy: every failure has a stable code and an HTTP status.

Edges translate these (FHIR → OperationOutcome, HL7 → ACK AE/AR + ERR, DICOM → status); the
core raises them and never formats protocol errors itself.
"""

from __future__ import annotations


class HieError(Exception):
    """Base error: ``code`` is stable (documented), ``status`` is the HTTP status to use."""

    code = "HIE-1000"
    status = 500
    issue = "exception"  # FHIR IssueType
    headers: dict[str, str] | None = None  # HTTP headers the response must carry

    def __init__(self, message: str, *, expression: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression or []


class InvalidRequest(HieError):
    """The request is malformed (bad JSON, bad parameter, wrong media)."""

    code = "HIE-1001"
    status = 400
    issue = "invalid"


class InvalidResource(HieError):
    """The resource fails validation; ``expression`` names the failing element."""

    code = "HIE-1002"
    status = 400
    issue = "structure"


class NotFound(HieError):
    """No such resource, version or route."""

    code = "HIE-1003"
    status = 404
    issue = "not-found"


class Gone(HieError):
    """The resource existed and was deleted."""

    code = "HIE-1004"
    status = 410
    issue = "deleted"


class VersionConflict(HieError):
    """``If-Match`` or a concurrent write disagreed with the stored version."""

    code = "HIE-1005"
    status = 412
    issue = "conflict"


class Conflict(HieError):
    """The write conflicts with stored state (e.g. a duplicate)."""

    code = "HIE-1006"
    status = 409
    issue = "conflict"


class PreconditionFailed(HieError):
    """A conditional operation matched more than one resource."""

    code = "HIE-1007"
    status = 412
    issue = "multiple-matches"


class PayloadTooLarge(HieError):
    """The body exceeds the configured limit."""

    code = "HIE-1008"
    status = 413
    issue = "too-long"


class UnsupportedMediaType(HieError):
    """The body's content type is not one we accept."""

    code = "HIE-1009"
    status = 415
    issue = "not-supported"


class UnknownSearchParameter(HieError):
    """A search parameter this server does not support (strict handling)."""

    code = "HIE-1010"
    status = 400
    issue = "not-supported"


class NotSupported(HieError):
    """An operation or interaction the server does not implement."""

    code = "HIE-1011"
    status = 405
    issue = "not-supported"


class Unprocessable(HieError):
    """Well-formed but semantically wrong (e.g. a transaction reference that resolves nowhere)."""

    code = "HIE-1012"
    status = 422
    issue = "processing"


class StorageError(HieError):
    """A storage backend failed; the write did not happen."""

    code = "HIE-1500"
    status = 503
    issue = "transient"


class Busy(HieError):
    """The hub holds writes of this kind back for now (``Retry-After`` says how long)."""

    code = "HIE-1501"
    status = 503
    issue = "throttled"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, retry_after))}


class BlobNotFound(NotFound):
    """No blob with that key."""

    code = "HIE-1013"


class BlobTooLarge(PayloadTooLarge):
    """A streamed blob exceeded its limit; nothing was kept."""

    code = "HIE-1014"


class BlobIntegrityError(HieError):
    """A blob's bytes do not match the expected hash or size."""

    code = "HIE-1015"
    status = 422
    issue = "invalid"


class RangeNotSatisfiable(HieError):
    """A byte range outside the body (HTTP 416, with ``Content-Range: bytes */size``)."""

    code = "HIE-1016"
    status = 416
    issue = "invalid"

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.headers = {"Content-Range": f"bytes */{size}"}

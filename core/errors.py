"""The one error hierarchy of dicomflow.

Every error carries a stable ``code`` (what dead letters, ``transfer_status`` and the
docs key on), the ``field`` it concerns when there is one, and a human ``message``.
Feeders read these codes, so a code is never renamed; new ones may be added.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Code",
    "DicomflowError",
    "ConfigError",
    "ContractError",
    "FileAccessError",
    "ExtractionError",
    "SinkError",
    "SinkRetryableError",
    "SinkDataError",
    "BrokerError",
]


class Code:
    """Stable error codes. Documented for feeders in docs/feeders.md."""

    INVALID_JSON = "INVALID_JSON"
    INVALID_EVENT = "INVALID_EVENT"
    PATH_ESCAPE = "PATH_ESCAPE"
    FILE_MISSING = "FILE_MISSING"
    FILE_UNREADABLE = "FILE_UNREADABLE"
    NOT_DICOM = "NOT_DICOM"
    FILE_TRUNCATED = "FILE_TRUNCATED"
    MISSING_REQUIRED_FIELD = "MISSING_REQUIRED_FIELD"
    VALUE_TOO_LONG = "VALUE_TOO_LONG"
    INVALID_DATE = "INVALID_DATE"
    INVALID_TIME = "INVALID_TIME"
    SINK_REJECTED = "SINK_REJECTED"
    #: The header parser's process died on the file (a crash, or the OOM killer).
    PARSER_CRASHED = "PARSER_CRASHED"
    #: The header's structure is beyond the reader's bounds (sequence nesting, element count).
    MALFORMED_DICOM = "MALFORMED_DICOM"
    #: The event's file lies in another tenant's tree of the storage root (docs/feeders.md).
    TENANT_MISMATCH = "TENANT_MISMATCH"


class DicomflowError(Exception):
    """Root of every error dicomflow raises on purpose."""

    code: str = "ERROR"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (the ingest parse pool): keep code and field.
        return (_rebuild, (type(self), self.message, self.code, self.field, dict(self.__dict__)))

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "field": self.field, "message": self.message}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, field={self.field!r}, message={self.message!r})"


def _rebuild(cls: type[DicomflowError], message: str, code: str, field: str | None,
             state: dict[str, Any]) -> DicomflowError:
    err = DicomflowError.__new__(cls)
    DicomflowError.__init__(err, message, code=code, field=field)
    err.__dict__.update(state)
    return err


class ConfigError(DicomflowError):
    """A setting is missing or malformed."""

    code = "CONFIG"


class ContractError(DicomflowError):
    """A storage event breaks the published contract (schemas/storage_event.v1.schema.json)."""

    code = Code.INVALID_EVENT


class FileAccessError(DicomflowError):
    """The event's file cannot be used: missing, unreadable, or outside the storage root."""

    code = Code.FILE_UNREADABLE


class ExtractionError(DicomflowError):
    """The file is not DICOM, or breaks the seeds' extraction rules."""

    code = Code.MISSING_REQUIRED_FIELD


class SinkError(DicomflowError):
    """A sink could not write a batch."""

    code = "SINK"


class SinkRetryableError(SinkError):
    """Transient: the same batch may succeed later (connection lost, server restarting)."""

    code = "SINK_RETRYABLE"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkDataError(SinkError):
    """The server rejected the data itself; retrying the same rows cannot succeed."""

    code = Code.SINK_REJECTED


class BrokerError(DicomflowError):
    """The Kafka-protocol broker is unreachable or refused a request."""

    code = "BROKER"

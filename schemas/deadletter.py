"""The dead-letter envelope shared by every stage: the original event, the error, where and when.

One builder, so ``dicomflow replay-dlq`` and operators read one format whichever stage
refused the event.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from core.errors import DicomflowError
from schemas import codec

__all__ = ["dead_letter"]


def dead_letter(*, error: DicomflowError, stage: str, worker: str, raw: bytes,
                original: Any = None, source: dict[str, Any] | None = None,
                now: datetime | None = None) -> bytes:
    """The dead-letter envelope: ``{original event, error, stage, time, worker}``.

    A message that is not JSON keeps its exact bytes in ``original_raw_base64`` so it
    can be inspected and replayed as it was.
    """
    letter: dict[str, Any] = {
        "original": original,
        "error": error.as_dict(),
        "stage": stage,
        "time": codec.format_datetime(now or datetime.now()),
        "worker": worker,
        "source": source,
    }
    if original is None:
        letter["original_raw_base64"] = base64.b64encode(raw).decode("ascii")
    return codec.dumps(letter)

"""The dead-letter envelope shared by every stage: the original event, the error, where and when.

One builder, so ``dicomflow replay-dlq`` and operators read one format whichever stage
refused the event.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from typing import Any

from core.errors import DicomflowError
from schemas import codec

__all__ = ["dead_letter", "MAX_ORIGINAL_BYTES"]

#: The most of an original event a dead letter carries. Kept well under the producer's
#: request size (1 MiB): a letter that cannot be sent would fail its whole batch. A
#: longer original keeps its size, its sha256 and its first bytes.
MAX_ORIGINAL_BYTES = 64 * 1024


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
    if len(raw) > MAX_ORIGINAL_BYTES:
        # Too big to carry whole (base64 would add a third): the reason, and enough to find it.
        letter["original"] = None
        letter["original_truncated"] = True
        letter["original_size"] = len(raw)
        letter["original_sha256"] = hashlib.sha256(raw).hexdigest()
        letter["original_raw_base64"] = base64.b64encode(raw[:MAX_ORIGINAL_BYTES]).decode("ascii")
    elif original is None:
        letter["original_raw_base64"] = base64.b64encode(raw).decode("ascii")
    return codec.dumps(letter)

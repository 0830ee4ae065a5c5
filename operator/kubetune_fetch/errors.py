"""The one error a fetch raises: a reason a controller can act on, and a message a person can."""

from __future__ import annotations

from typing import Literal

# NotFound: the repository, revision, bucket or files do not exist (fix the spec).
# Unauthorized: the credentials are missing, wrong or not allowed (fix the Secret).
# Unavailable: the network or the server failed (retry with backoff).
# Invalid: the source lists something that cannot be written safely (e.g. a `..` path).
# Storage: the destination cannot be written (disk full, permissions).
FetchErrorReason = Literal["NotFound", "Unauthorized", "Unavailable", "Invalid", "Storage"]


class FetchError(Exception):
    """A download that cannot complete; `str()` names the source, the cause and the fix."""

    def __init__(self, reason: FetchErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: FetchErrorReason = reason

    @property
    def retryable(self) -> bool:
        """Whether trying again unchanged may succeed (a network or server failure)."""
        return self.reason == "Unavailable"

"""The service's own errors, and every error's HTTP status, mapped in one place.

Domain errors come from the library (`shards.errors`) and from here; `status_for`
maps each to the status the API answers (401, 403, 404, 409, 429, 503, 400); every
error body is `{"error": "<message>"}`.
"""

from __future__ import annotations

from shards.errors import (
    CDMError,
    DataError,
    LabelUnavailableError,
    StoreError,
    StoreUnavailableError,
    TextUnavailableError,
    UnknownContributorError,
)


class AuthError(CDMError):
    """Missing, invalid, revoked or expired API key (HTTP 401)."""


class ForbiddenError(CDMError):
    """A valid key without the right (HTTP 403)."""


class RateLimitError(CDMError):
    """Too many failed key checks, or too much spend for one key (HTTP 429)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))


class NotFoundError(CDMError):
    """A request, job or contributor that does not exist (HTTP 404)."""


class UnavailableError(CDMError):
    """The store has no live contributor to generate with (HTTP 503)."""


class DatabaseUnavailable(CDMError):
    """The database is unreachable, refuses the credentials or stays locked (HTTP 503
    with Retry-After: nothing of the request was done or billed)."""

    retry_after = 5


class Postponed(Exception):
    """A job stops without finishing; it stays `running` and the next start resumes it."""


# the first match wins: subclasses before their bases
STATUS: list[tuple[type[Exception], int]] = [
    (AuthError, 401), (ForbiddenError, 403), (UnknownContributorError, 404),
    (LabelUnavailableError, 404), (TextUnavailableError, 404), (NotFoundError, 404), (RateLimitError, 429),
    (UnavailableError, 503), (DatabaseUnavailable, 503), (StoreUnavailableError, 503), (DataError, 400), (StoreError, 409), (ValueError, 400),
]
REASONS = {400: "Bad input", 401: "Missing, invalid, revoked or expired key",
           403: "The key lacks the right or the licence", 404: "Not found",
           409: "Conflicts with the store's state", 413: "Body too large",
           415: "The body is not application/json",
           429: "Rate limited; see Retry-After", 503: "No live contributor, or the database is unreachable"}


def status_for(err: Exception) -> int:
    """The HTTP status of a domain error (CDMError or ValueError)."""
    return next(code for cls, code in STATUS if isinstance(err, cls))

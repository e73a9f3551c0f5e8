"""Domain errors raised by the library; the CLI and the service map them to messages
and HTTP statuses in one place each."""


class CDMError(Exception):
    """Base class of every error this project raises on purpose."""


class DataError(CDMError, ValueError):
    """Contributor data is missing, malformed or inconsistent."""


class StoreError(CDMError):
    """A shard store is missing, corrupt, or asked for something it does not hold."""


class StoreUnavailableError(StoreError):
    """The store's storage, or the database that coordinates its hosts, cannot be
    reached now (HTTP 503 with Retry-After); nothing was changed."""

    retry_after = 5


class UnknownContributorError(StoreError, KeyError):
    """A contributor id that the store does not (or no longer) hold."""

    def __init__(self, contributor_ids: list[str] | str):
        if isinstance(contributor_ids, str):
            contributor_ids = [contributor_ids]
        self.contributor_ids = list(contributor_ids)
        shown = ", ".join(short(c, 64) for c in self.contributor_ids[:8])
        more = f" and {len(self.contributor_ids) - 8} more" if len(self.contributor_ids) > 8 else ""
        super().__init__(f"unknown contributor(s): {shown}{more}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class LabelUnavailableError(CDMError, LookupError):
    """No contributor of the requested subset holds a requested label."""

    def __init__(self, label: int, held: dict[str, list[int]], unlabelled: bool = False):
        self.label, self.held = label, held
        if unlabelled:
            super().__init__(f"no contributor holds label {label}: this store is unlabelled "
                             "(its contributors' data has no labels); omit the label")
            return
        shown = "; ".join(f"{c}: {', '.join(map(str, ys)) or 'none'}"
                          for c, ys in list(held.items())[:16])
        more = f"; and {len(held) - 16} more" if len(held) > 16 else ""
        super().__init__(f"no licensed, live contributor holds label {label}; labels held: "
                         f"{shown}{more}")

    def __str__(self) -> str:
        return self.args[0]


class TextUnavailableError(CDMError, LookupError):
    """A prompt sent to a store without text conditioning, or a label to a text store."""

    def __init__(self, what: str, supports: str):
        super().__init__(f"{what}; it supports {supports}")

    def __str__(self) -> str:
        return self.args[0]


def short(value: object, limit: int = 80) -> str:
    """`value` as text, cut to `limit` characters: ids from a request are echoed in
    errors, and an error must not be as large as the input that caused it."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

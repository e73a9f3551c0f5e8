"""Domain errors raised by the library; the CLI and the service map them to messages
and HTTP statuses in one place each."""


class CDMError(Exception):
    """Base class of every error this project raises on purpose."""


class DataError(CDMError, ValueError):
    """Contributor data is missing, malformed or inconsistent."""


class StoreError(CDMError):
    """A shard store is missing, corrupt, or asked for something it does not hold."""


class UnknownContributorError(StoreError, KeyError):
    """A contributor id that the store does not (or no longer) hold."""

    def __init__(self, contributor_ids: list[str] | str):
        if isinstance(contributor_ids, str):
            contributor_ids = [contributor_ids]
        self.contributor_ids = list(contributor_ids)
        super().__init__(f"unknown contributor(s): {', '.join(self.contributor_ids)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]

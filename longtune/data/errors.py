"""The one exception type of longtune.data."""

from longtune.errors import LongtuneError


class DataError(LongtuneError, ValueError):
    """A data problem worded for the user in one line that names the file or path."""

"""The one exception type of longtune.data."""


class DataError(ValueError):
    """A data problem worded for the user in one line that names the file or path."""

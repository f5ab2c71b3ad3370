"""Mistakes in a run's config or command line: the entry points print one line and exit 2.

`ConfigError` subclasses ValueError, so library callers that catch ValueError still do.
"""


class ConfigError(ValueError):
    """A config value that cannot work (named in the message with the key to change)."""

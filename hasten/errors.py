"""User-facing errors.

A :class:`HastenError` carries a one-line message that says what went wrong and what to do. The CLI prints it
to stderr without a traceback and exits with status 2; library callers can catch it like any exception.
"""


class HastenError(ValueError):
    """Bad input, missing data or a corrupt file: a one-line message that says what to do."""

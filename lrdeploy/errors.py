"""One exception type for every user-facing failure: the CLI prints its message on one line and exits non-zero."""


class LrdError(Exception):
    """A problem the user can fix: bad input, missing file, unsupported model. Never a bug."""

    exit_code = 2

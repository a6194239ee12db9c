"""The one exception type for mistakes a user can fix: the CLI prints its message on one line."""


class UserError(Exception):
    """Bad input (a file, a flag, a model we cannot convert). The message says what and how to fix it."""

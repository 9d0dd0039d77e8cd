"""Errors that the CLI turns into one line and exit code 2."""


class UserError(Exception):
    """A problem with the user's input: the CLI prints one line and exits 2."""

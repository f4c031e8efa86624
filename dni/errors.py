"""The one error type a user sees: a one-line message, printed by the CLI with exit code 2."""


class DNIError(Exception):
    """Bad input or a run that cannot go on; its message is one line that says what to do."""

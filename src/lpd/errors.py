"""The one error type the CLI turns into a one-line message and exit code 2."""


class LpdError(Exception):
    """A problem with the user's input or files, stated so they can fix it."""

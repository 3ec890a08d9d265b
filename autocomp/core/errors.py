"""The one exception type that reaches the user as a single line."""


class AutocompError(Exception):
    """A failure caused by the user's input or environment.

    The CLI prints it as one line (``autocomp: error: ...``) and exits with
    status 2; anything else is a bug and keeps its traceback.
    """

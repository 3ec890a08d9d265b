"""The one exception type that reaches the user as a single line."""


class AutocompError(Exception):
    """A failure caused by the user's input or environment.

    The CLI prints it as one line (``autocomp: error: ...``) and exits with
    status 2; anything else is a bug and keeps its traceback.
    """


class DamagedStore(AutocompError):
    """A store every trial reads (the tuning database, say) is damaged: no later trial can
    succeed on it, so a search stops at the first trial that meets it instead of failing
    them one by one."""

"""The one base class of the errors a user can fix: the CLI prints the message, one line
that names the problem and the fix, and exits 2. Anything else is a bug and keeps its traceback."""


class MnistDistError(Exception):
    """Input, a run or an environment the user can fix; the message says how."""


class RunError(MnistDistError):
    """A run, or the storage it lives in, that cannot be used; the message says why and what to do."""

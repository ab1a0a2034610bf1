"""The one exception type for user mistakes.

Components raise `UserError` (a `ValueError`) with a message that names the file, line, key or flag,
says what was expected and what to do. The command line prints it without a traceback and exits 2.
Programming errors stay `assert`s and ordinary exceptions, and keep their tracebacks.
"""


class UserError(ValueError):
    """Bad input from the user: the message alone must be enough to fix it."""

"""Errors that reach the user: one line naming the problem and the fix; the CLI exits non-zero on them.

Exit codes of the `sparseforge` command (documented in the README):
  0  success
  1  an internal error (a bug: one line, the traceback with --debug)
  2  bad input from the user (UserInputError)
  3  the machine stopped the run (EnvironmentFailure: a full disk, a quota, not enough memory)
  130 interrupted (Ctrl-C)
"""

EXIT_INTERNAL = 1
EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130


class UserInputError(ValueError):
    """Bad input from the user (a path, a recipe, a parameter). The message says what is wrong and how to fix it."""


class EnvironmentFailure(RuntimeError):
    """The machine, not the input, stopped the run: a full disk or quota, not enough memory. The message names
    the resource, the place and, where known, how much was needed."""

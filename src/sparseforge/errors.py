"""Errors that reach the user: one line naming the problem and the fix; the CLI exits non-zero on them."""


class UserInputError(ValueError):
    """Bad input from the user (a path, a recipe, a parameter). The message says what is wrong and how to fix it."""

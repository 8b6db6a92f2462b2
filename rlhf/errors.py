"""Errors a user can cause. The CLI prints their message as one sentence, no traceback."""


class UserError(Exception):
    """A problem with the user's input (recipe, reward function, model, data) and its fix."""

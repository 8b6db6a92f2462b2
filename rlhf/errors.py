"""Errors a user can cause, and the config checks that raise them. The CLI prints their message
as one sentence, no traceback."""


class UserError(Exception):
    """A problem with the user's input (recipe, reward function, model, data) and its fix."""


def check_choices(cfg) -> None:
    """Every key listed in ``cfg.choices`` holds one of its allowed values."""
    for key, options in cfg.choices.items():
        value = getattr(cfg, key, None)
        if value is not None and value not in options:
            raise UserError(f"{key}={value!r} is not valid; choose one of {', '.join(options)}")



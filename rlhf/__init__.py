"""rlhf: RL fine-tuning of language models and gym agents on one loss core.

From Python: ``rlhf.train(recipe, rewards=..., dataset=..., **overrides) -> TrainResult`` and
``rlhf.evaluate(run_dir or result)`` (``rlhf/api.py``), imported on first use so that
``import rlhf`` stays cheap (no torch). By name, as the trainer registry does: the package is
the facade at the top of the house, and the modules below it that write ``from rlhf import x``
(an import of ``rlhf.x``) must not be seen to import the API.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["Policy", "TrainResult", "UserError", "evaluate", "train"]

_API = ("train", "evaluate", "TrainResult", "Policy")


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("rlhf.api"), name)
    if name == "UserError":
        return importlib.import_module("rlhf.errors").UserError
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")


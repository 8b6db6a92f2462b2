"""rlhf: RL fine-tuning of language models and gym agents on one loss core."""

__version__ = "0.1.0"

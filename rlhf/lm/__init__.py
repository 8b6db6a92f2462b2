"""Language models: loading, LoRA policies, rollouts and token log-probs, and the reward model."""

"""Language-model policies: loading, LoRA, generation and token log-probs."""

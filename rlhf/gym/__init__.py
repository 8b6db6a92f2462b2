"""What gym agents are made of: envs, networks, replay, recipe config, evaluation and progress.
Their trainers (REINFORCE with a baseline, A2C, PPO, TRPO, DQN, SAC, tabular Q-learning) live in
``rlhf/trainers/``."""

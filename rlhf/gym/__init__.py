"""Gym agents on the shared loss core: REINFORCE with a baseline (reinforce), A2C, PPO, TRPO, DQN
(Double / Dueling), SAC and tabular Q-learning on gymnasium envs."""

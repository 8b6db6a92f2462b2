"""Language-model agents in environments: text environments (gymnasium ids rendered as text,
a user's own ``module:Class`` or ``path/to/file.py:Class``), multi-turn episodes as a rollout
source (``rlhf.lm.rollout_record``), and the ``choose`` action mode (a categorical over the
valid actions, each scored by the model's log-probability of its text).

    text_envs.py      renderers of FrozenLake, CliffWalking, Taxi, Blackjack; random-map FrozenLake
    env_loading.py    an ``env:`` value -> a text environment
    chat_turns.py     the chat template applied turn by turn, and its prefix property checked
    episodes.py       the episode rollout source (token-in, token-out) for ``generate`` mode
    choose.py         ``choose`` mode: scoring the valid actions, sampling and the training forward
"""

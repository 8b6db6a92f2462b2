"""Gymnasium's text-sized environments rendered as text: the observation as a few lines a
language model can read, the valid actions named.

A text environment has gymnasium's API with text in place of numbers:

    reset(seed=None, options=None) -> (observation: str, info: dict)
    step(action: str)              -> (observation: str, reward: float, terminated: bool,
                                       truncated: bool, info: dict)

``info["valid_actions"]`` (a list of strings) names the actions the agent may take now; the
``choose`` mode needs it. ``info["invalid_action"] = True`` from ``step`` says the text named no
valid action: the state is unchanged, and the episode runner applies the recipe's penalty or
ends the episode. ``instructions`` (a string, optional) is what the agent is told once, before
the first observation.

Parsing an action: the reply names exactly one distinct valid action as a whole word (case
ignored), else it is invalid. ``FrozenLakeRandom`` draws a new 4x4 map per seed; maps are split
by a hash of their layout into training maps and held-out maps, which never meet.
"""
from __future__ import annotations

import re
from functools import partial


def parse_action(text: str, names: list[str]) -> int | None:
    """The index of the one valid action ``text`` names (a whole word, case ignored); None when
    it names none or several different ones."""
    said = {i for i, name in enumerate(names)
            if re.search(rf"(?<![A-Za-z]){re.escape(name.lower())}(?![A-Za-z])", text.lower())}
    return said.pop() if len(said) == 1 else None


def make_gym(env_id: str, **kwargs):
    """``gymnasium.make``, imported when an environment is made: importing the trainer for a
    single-turn LM run must not import gymnasium (a GPU machine may not have it)."""
    import gymnasium

    return gymnasium.make(env_id, **kwargs)


class RenderedEnv:
    """A gymnasium environment with discrete actions as a text environment: ``render_obs``
    turns the numeric observation into text, ``ACTIONS`` names the actions by index."""

    ACTIONS: list[str] = []
    INSTRUCTIONS = ""

    def __init__(self, env_id: str, env=None, **kwargs):
        """``env``: an environment made already (else ``gymnasium.make(env_id, **kwargs)``)."""
        self.env = env if env is not None else make_gym(env_id, **kwargs)
        self.instructions = self.INSTRUCTIONS + f" Reply with one action: {', '.join(self.ACTIONS)}."
        self.obs = None

    def render_obs(self, obs) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.render_obs(self.obs)}\nValid actions: {', '.join(self.ACTIONS)}."

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self.obs, _ = self.env.reset(seed=seed, options=options)
        return self.describe(), {"valid_actions": list(self.ACTIONS)}

    def step(self, action: str):
        a = parse_action(action, self.ACTIONS)
        info = {"valid_actions": list(self.ACTIONS)}
        if a is None:
            return self.describe(), 0.0, False, False, {**info, "invalid_action": True}
        self.obs, reward, terminated, truncated, env_info = self.env.step(a)
        if "success" in env_info:  # (where the reward alone does not say it: shaping)
            info["success"] = env_info["success"]
        return self.describe(), float(reward), bool(terminated), bool(truncated), info


def char_rows(desc) -> list[list[str]]:
    """A map's rows (of bytes or str) as lists of one-character strings."""
    return [[c.decode() if isinstance(c, bytes) else c for c in line] for line in desc]


def grid_text(desc, row: int, col: int) -> str:
    """A character grid (rows of bytes or str) with the agent drawn as ``P`` at (row, col)."""
    lines = char_rows(desc)
    lines[row][col] = "P"
    return "\n".join("".join(line) for line in lines)


TILES = {"F": "ice", "S": "ice", "H": "hole", "G": "goal"}  # FrozenLake's tiles, as a move's hint names them


class FrozenLakeText(RenderedEnv):
    ACTIONS = ["left", "down", "right", "up"]
    INSTRUCTIONS = ("You walk on a frozen lake drawn as a grid: P is you, F frozen ice (safe), H a hole "
                    "(you fall in and lose), G the goal (reach it to win), S the start.")

    def __init__(self, env_id: str = "FrozenLake-v1", hints: bool = False, **kwargs):
        super().__init__(env_id, **kwargs)
        self.hints = hints

    def render_obs(self, obs) -> str:
        ncol = self.env.unwrapped.ncol
        row, col = divmod(int(obs), ncol)
        grid = grid_text(self.env.unwrapped.desc, row, col)
        if self.hints:  # (the moves line names the valid actions too)
            return f"{grid}\n{self.moves_text(row, col)}"
        return f"{grid}\nYou are at row {row + 1}, column {col + 1}."

    def describe(self) -> str:
        return self.render_obs(self.obs) if self.hints else super().describe()

    def moves_text(self, row: int, col: int) -> str:
        """``hints``: what each move leads to, and where the goal is, in words."""
        desc = char_rows(self.env.unwrapped.desc)
        n = len(desc)
        ahead = []
        for name, (dr, dc) in zip(self.ACTIONS, ((0, -1), (1, 0), (0, 1), (-1, 0))):
            r, c = row + dr, col + dc
            ahead.append(f"{name}: " + ("wall" if not (0 <= r < n and 0 <= c < len(desc[0])) else TILES[desc[r][c]]))
        goal = next((r, c) for r in range(n) for c in range(len(desc[0])) if desc[r][c] == "G")
        return f"Moves: {', '.join(ahead)}. The goal is {goal[0] - row} down and {goal[1] - col} right."


class FrozenLakeRandom(FrozenLakeText):
    """FrozenLake on a fresh random ``size`` x ``size`` map per seed, not slippery by default:
    ``rlhf.gym.random_lake.RandomLake`` (its maps, their split into ``train`` and held-out
    ``eval`` maps, its optional potential-based ``shaping``) rendered as text. ``rlhf eval``
    plays the held-out maps."""

    held_out_kwargs = {"split": "eval"}

    def __init__(self, size: int = 4, p: float = 0.8, is_slippery: bool = False, split: str = "train",
                 eval_every: int = 5, max_episode_steps: int = 100, shaping: float = 0.0, hints: bool = False):
        from rlhf.gym.random_lake import RandomLake

        super().__init__("FrozenLake-v1", hints,
                         env=RandomLake(size, p, is_slippery, split, eval_every, max_episode_steps, shaping))

    def map_for(self, seed: int | None) -> list[str]:
        return self.env.map_for(seed)

    def render_obs(self, obs) -> str:
        return super().render_obs(self.env.state)  # (obs: the classic agents' planes)


class CliffWalkingText(RenderedEnv):
    ACTIONS = ["up", "right", "down", "left"]
    INSTRUCTIONS = ("You walk on a 4x12 grid from S (bottom left) to G (bottom right): P is you, C the cliff "
                    "(stepping on it costs 100 and sends you back to S), every step costs 1.")

    def __init__(self, env_id: str = "CliffWalking-v1", **kwargs):
        super().__init__(env_id, **kwargs)

    def render_obs(self, obs) -> str:
        rows, cols = self.env.unwrapped.shape
        desc = [["."] * cols for _ in range(rows)]
        desc[rows - 1] = ["S"] + ["C"] * (cols - 2) + ["G"]
        row, col = divmod(int(obs), cols)
        return f"{grid_text(desc, row, col)}\nYou are at row {row + 1}, column {col + 1}."


class TaxiText(RenderedEnv):
    ACTIONS = ["south", "north", "east", "west", "pickup", "dropoff"]
    INSTRUCTIONS = ("You drive a taxi (P) on a 5x5 grid with walls (|). Pick the passenger up at their "
                    "stop and drop them off at their destination: +20 for a delivery, -1 a step, -10 for "
                    "a wrong pickup or dropoff. North is up.")
    STOPS = ["R", "G", "Y", "B"]

    def __init__(self, env_id: str = "Taxi-v4", **kwargs):
        super().__init__(env_id, **kwargs)

    def render_obs(self, obs) -> str:
        row, col, passenger, dest = self.env.unwrapped.decode(int(obs))
        rows = [line.decode() if isinstance(line, bytes) else line
                for line in ["".join(c.decode() for c in r) for r in self.env.unwrapped.desc]]
        grid = [list(r) for r in rows]
        grid[1 + row][2 * col + 1] = "P"
        where = "in the taxi" if passenger == 4 else f"waiting at {self.STOPS[passenger]}"
        return "\n".join("".join(r) for r in grid) + f"\nThe passenger is {where}; the destination is " \
            f"{self.STOPS[dest]}."


class BlackjackText(RenderedEnv):
    ACTIONS = ["stick", "hit"]
    INSTRUCTIONS = ("You play blackjack against the dealer: get closer to 21 than the dealer without going "
                    "over. hit draws a card, stick ends your turn. Win +1, lose -1, draw 0.")

    def __init__(self, env_id: str = "Blackjack-v1", **kwargs):
        super().__init__(env_id, **kwargs)

    def render_obs(self, obs) -> str:
        total, dealer, ace = (int(x) for x in obs)
        card = "an ace" if dealer == 1 else str(dealer)
        soft = " (with an ace counted as 11)" if ace else ""
        return f"Your cards total {total}{soft}. The dealer shows {card}."


# gymnasium ids (and our random-map FrozenLake) with a shipped text rendering
RENDERED = {
    "FrozenLake-v1": partial(FrozenLakeText, "FrozenLake-v1"),
    "FrozenLake8x8-v1": partial(FrozenLakeText, "FrozenLake8x8-v1"),
    "FrozenLakeRandom-v0": FrozenLakeRandom,
    "CliffWalking-v1": partial(CliffWalkingText, "CliffWalking-v1"),
    "Taxi-v4": partial(TaxiText, "Taxi-v4"),
    "Blackjack-v1": partial(BlackjackText, "Blackjack-v1"),
}

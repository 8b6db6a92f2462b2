"""Text environments: the shipped renderings (observation as text, the valid actions named),
action parsing, random FrozenLake maps split into training and held-out maps that never meet,
and a user's environment loaded from ``module:Class`` or ``path/to/file.py:Class``."""
import pytest

from rlhf.agents.env_loading import env_factory
from rlhf.agents.text_envs import RENDERED, FrozenLakeRandom, parse_action
from rlhf.gym.random_lake import map_hash
from rlhf.errors import UserError

USER_ENV = '''
class Guess:
    """Guess the secret word; two tries."""
    instructions = "Guess the secret word."

    def __init__(self, secret="apple"):
        self.secret = secret

    def reset(self, seed=None, options=None):
        self.tries = 0
        return "Your guess?", {"valid_actions": ["apple", "pear"]}

    def step(self, action):
        self.tries += 1
        won = self.secret in action.lower()
        return ("Right." if won else "Wrong."), float(won), won, self.tries >= 2, {}
'''


def test_frozenlake_renders_its_grid_and_names_its_actions():
    env = RENDERED["FrozenLake-v1"](is_slippery=False)
    obs, info = env.reset(seed=0)
    assert obs == ("PFFF\nFHFH\nFFFH\nHFFG\nYou are at row 1, column 1.\n"
                   "Valid actions: left, down, right, up.")
    assert info["valid_actions"] == ["left", "down", "right", "up"]
    obs, reward, terminated, truncated, info = env.step("I go right.")
    assert obs.startswith("SPFF\n") and (reward, terminated, truncated) == (0.0, False, False)
    assert "invalid_action" not in info
    obs2, reward, terminated, _, info = env.step("left or right?")  # two actions named: invalid
    assert info["invalid_action"] and obs2 == obs and not terminated


@pytest.mark.parametrize("env_id,action,expected", [
    ("CliffWalking-v1", "right", -100.0),  # the first step right from S is the cliff
    ("Taxi-v4", "north", -1.0),
    ("Blackjack-v1", "stick", None),
])
def test_every_shipped_rendering_steps_on_named_actions(env_id, action, expected):
    env = RENDERED[env_id]()
    obs, info = env.reset(seed=0)
    assert isinstance(obs, str) and action in info["valid_actions"] and action in env.instructions
    _, reward, *_ = env.step(action)
    assert expected is None or reward == expected


def test_parse_action_needs_exactly_one_named_action():
    names = ["left", "down", "right", "up"]
    assert parse_action("Down.", names) == 1
    assert parse_action("up, up and up", names) == 3
    assert parse_action("upward", names) is None  # a whole word only
    assert parse_action("left then right", names) is None
    assert parse_action("", names) is None


def test_random_maps_split_into_training_and_held_out_maps():
    train, held = FrozenLakeRandom(split="train"), FrozenLakeRandom(split="eval")
    train_maps = {tuple(train.map_for(s)) for s in range(200)}
    held_maps = {tuple(held.map_for(s)) for s in range(200)}
    assert not train_maps & held_maps and len(held_maps) > 20
    assert all(map_hash(list(m)) % 5 == 0 for m in held_maps)
    assert train.map_for(7) == train.map_for(7)  # a seed is one map
    obs, _ = train.reset(seed=7)
    assert obs.splitlines()[:4] == ["P" + train.map_for(7)[0][1:]] + train.map_for(7)[1:]


def test_frozen_lake_hints_name_what_each_move_leads_to():
    env = FrozenLakeRandom(hints=True)
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        desc = env.map_for(seed)
        tile = {"F": "ice", "H": "hole"}
        expected = (f"Moves: left: wall, down: {tile[desc[1][0]]}, right: {tile[desc[0][1]]}, up: wall. "
                    "The goal is 3 down and 3 right.")
        assert obs.splitlines()[4] == expected and len(obs.splitlines()) == 5
        if desc[0][1] == "F":
            obs, *_ = env.step("right")
            assert "The goal is 3 down and 2 right." in obs and "left: ice" in obs
    assert "Moves:" not in FrozenLakeRandom().reset(seed=0)[0]


def test_a_users_environment_loads_from_a_file_and_from_a_module(tmp_path, monkeypatch):
    path = tmp_path / "guess_env.py"
    path.write_text(USER_ENV)
    env = env_factory(f"{path}:Guess", {"secret": "pear"})()
    assert env.reset(seed=0)[0] == "Your guess?" and env.step("pear")[1:4] == (1.0, True, False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert env_factory("guess_env:Guess")().secret == "apple"


def test_bad_env_values_are_named_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="has no text rendering"):
        env_factory("Pong-v5")
    with pytest.raises(UserError, match="does not exist"):
        env_factory(f"{tmp_path}/none.py:Env")
    (tmp_path / "e.py").write_text("class NotAnEnv:\n    pass\n")
    with pytest.raises(UserError, match="has no reset and no step"):
        env_factory(f"{tmp_path}/e.py:NotAnEnv")()
    with pytest.raises(UserError, match="has no class 'Missing'"):
        env_factory(f"{tmp_path}/e.py:Missing")


TRL_ENV = '''
class Counter:
    """A TRL environment_factory class: reset(**row) returns text, public methods are tools."""

    def reset(self, **row):
        self.count, self.reward = 0, 0.0
        return "Count to two, then answer."

    def increment(self, by: int) -> str:
        """Add ``by`` to the counter."""
        self.count += by
        self.reward = 1.0 if self.count == 2 else 0.0
        return f"count={self.count}"
'''


def test_a_trl_environment_class_works_unchanged(tmp_path):
    from rlhf.agents.tool_env import parse_tool_call

    (tmp_path / "counter.py").write_text(TRL_ENV)
    env = env_factory(f"{tmp_path}/counter.py:Counter")()
    assert "- increment(by: int) -> str: Add ``by`` to the counter." in env.instructions
    assert env.reset(seed=3)[0] == "Count to two, then answer."
    call = '<tool_call>{"name": "increment", "arguments": {"by": 1}}</tool_call>'
    assert parse_tool_call("I will " + call) == ("increment", {"by": 1})
    assert env.step(call)[:3] == ("count=1", 0.0, False)
    assert env.step('{"name": "increment", "arguments": {"by": 1}}')[:3] == ("count=2", 1.0, False)
    obs, reward, terminated, _, info = env.step('{"name": "decrement", "arguments": {}}')
    assert obs.startswith("Error: no tool 'decrement'") and info["invalid_action"] and not terminated
    assert env.step('{"name": "increment", "arguments": {"by": "x"}}')[0].startswith("Error: TypeError")
    assert env.step("The count is two.")[1:3] == (0.0, True)  # the answer ends it; the return so far is 1

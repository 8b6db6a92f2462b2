"""Random FrozenLake maps, the task the language-model agent and the classic agents share: the
map in the classic agents' observation, potential-based shaping worth exactly what its formula
says, the registered ids (training maps, held-out maps, 8 moves), and the text environment
rendering the same map and position."""
from collections import deque

import numpy as np
import pytest

from rlhf.agents.text_envs import FrozenLakeRandom
from rlhf.gym.envs import make_env
from rlhf.gym.random_lake import RandomLake, map_hash

MOVES = {0: (0, -1), 1: (1, 0), 2: (0, 1), 3: (-1, 0)}  # left, down, right, up


def shortest_path(desc: list[str]) -> list[int]:
    """Actions of a shortest path from S to G avoiding holes (breadth-first)."""
    n = len(desc)
    prev, queue = {(0, 0): None}, deque([(0, 0)])
    while queue:
        r, c = queue.popleft()
        for a, (dr, dc) in MOVES.items():
            nr, nc = r + dr, c + dc
            if 0 <= nr < n and 0 <= nc < n and desc[nr][nc] != "H" and (nr, nc) not in prev:
                prev[(nr, nc)] = ((r, c), a)
                queue.append((nr, nc))
    path, at = [], (n - 1, n - 1)
    while prev[at] is not None:
        at, a = prev[at]
        path.append(a)
    return path[::-1]


def test_the_map_is_in_the_observation():
    env = RandomLake()
    obs, _ = env.reset(seed=3)
    desc = env.map_for(3)
    planes = obs.reshape(3, 4, 4)
    assert (planes[0] == np.array([[ch == "H" for ch in row] for row in desc])).all()
    assert planes[1][3, 3] == 1 and planes[1].sum() == 1
    assert planes[2][0, 0] == 1 and planes[2].sum() == 1


@pytest.mark.parametrize("shaping", [0.0, 1.0, 0.3])
def test_shaping_is_the_potential_difference(shaping):
    """Each move earns shaping * (d(s) - d(s')) / 6 (d: Manhattan distance to G, 6 from S);
    a shortest path to G earns 1 + shaping in all, a bump into the wall 0."""
    env = RandomLake(shaping=shaping)
    for seed in range(5):
        env.reset(seed=seed)
        assert env.step(0)[1] == 0.0 and env.step(3)[1] == 0.0  # left and up from S: walls
        total, done = 0.0, False
        for a in shortest_path(env.map_for(seed)):
            _, r, done, _, info = env.step(a)
            total += r
        assert done and info["success"] and total == pytest.approx(1.0 + shaping, abs=1e-12)
    for seed in range(40):  # one move right, toward G: shaping / 6, into a hole too (no success)
        env.reset(seed=seed)
        _, r, terminated, _, info = env.step(2)
        assert r == pytest.approx(shaping / 6) and not info["success"]
        if terminated:
            assert env.map_for(seed)[0][1] == "H"
            break
    else:
        pytest.fail("no map of seeds 0-39 has a hole right of S")


def test_registered_ids_play_training_and_held_out_maps_for_eight_moves():
    train, held = make_env("rlhf/FrozenLakeRandom-v0"), make_env("rlhf/FrozenLakeRandomHeldOut-v0")
    maps = {}
    for name, env in (("train", train), ("eval", held)):
        env.reset(seed=0)
        seen = set()
        for _ in range(30):  # without a seed: the next map from the env's generator
            env.reset()
            seen.add(tuple(b"".join(row).decode() for row in env.unwrapped.desc))
        maps[name] = seen
        assert len(seen) > 10
    assert not maps["train"] & maps["eval"]
    assert all(map_hash(list(m)) % 5 == 0 for m in maps["eval"])
    train.reset(seed=1)
    steps = 0
    while True:  # bump into the left wall until the time limit
        *_, terminated, truncated, _ = train.step(0)
        steps += 1
        if terminated or truncated:
            break
    assert steps == 8 and truncated


def test_the_text_environment_renders_the_same_map_and_position():
    text, numeric = FrozenLakeRandom(split="eval"), RandomLake(split="eval")
    obs, _ = text.reset(seed=11)
    numeric.reset(seed=11)
    assert obs.splitlines()[:4] == ["P" + numeric.map_for(11)[0][1:]] + numeric.map_for(11)[1:]
    a = shortest_path(numeric.map_for(11))[0]
    obs, *_ = text.step(["left", "down", "right", "up"][a])
    numeric.step(a)
    row, col = divmod(numeric.state, 4)
    assert obs.splitlines()[row][col] == "P" and f"row {row + 1}, column {col + 1}" in obs

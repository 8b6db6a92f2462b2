"""Resumable checkpoints of gym runs (``save_every`` env steps; ``rlhf train --resume RUN_DIR``).

A checkpoint holds everything the loop's next step depends on, so a resumed run ends with the
metrics and weights of an uninterrupted one, bit for bit:

    checkpoint-N/policy/model.safetensors   the acting network (RUN_DIR/policy links to it)
    checkpoint-N/replay.safetensors         DQN / SAC: the filled rows of the replay buffer
    checkpoint-N/state.pt                   every network, optimiser, RNG stream (torch, Python,
                                            NumPy global, the loop's Generator, each env's and
                                            its action space's), each env's simulator state and
                                            episode counters, reward/obs normaliser statistics,
                                            the progress counters and the loop's own values

Saving draws no random number and changes no state, so a run with checkpoints trains exactly as
one without. Envs stepped in worker processes (``env_processes``) are not checkpointed: their
state lives in other processes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rlhf import checkpoint
from rlhf.errors import UserError
from rlhf.gym.common import POLICY_DIR, POLICY_FILE

FOLLOW = {POLICY_DIR: POLICY_DIR}  # RUN_DIR/policy: the newest checkpoint's policy until the final save
REPLAY_FILE = "replay.safetensors"
_SKIP = {"np_random", "_np_random", "_np_random_seed", "spec", "metadata", "render_mode"}


# ---------------------------------------------------------------------- plain values
def _encode(v):
    """NumPy values as tensors / tagged scalars, dicts with str/int keys as lists of pairs
    (``torch.load(weights_only=True)`` reads them); ``...`` for what cannot be stored as plain
    data (``unsaved`` says whether that matters)."""
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "SU":  # text grids (FrozenLake's map): latin-1 round-trips every byte
            text = np.char.decode(v, "latin-1") if v.dtype.kind == "S" else v
            return {"__nd_text__": text.tolist(), "dtype": v.dtype.str}
        try:
            return {"__nd__": torch.from_numpy(v.copy())}
        except TypeError:  # (object arrays)
            return ...
    if isinstance(v, dict):
        if not all(isinstance(k, (str, int)) for k in v):
            return ...
        items = [[k, _encode(x)] for k, x in v.items()]
        return ... if any(x is ... for _, x in items) else {"__map__": items}
    if isinstance(v, np.generic):
        return {"__np__": v.item(), "dtype": str(v.dtype)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        items = [_encode(x) for x in v]
        return ... if any(x is ... for x in items) else {"__seq__": items, "tuple": isinstance(v, tuple)}
    return ...


def _decode(v):
    if isinstance(v, dict) and "__nd__" in v:
        return v["__nd__"].numpy().copy()
    if isinstance(v, dict) and "__nd_text__" in v:
        dtype = np.dtype(v["dtype"])
        text = np.array(v["__nd_text__"], dtype=str)
        return (np.char.encode(text, "latin-1") if dtype.kind == "S" else text).astype(dtype)
    if isinstance(v, dict) and "__map__" in v:
        return {k: _decode(x) for k, x in v["__map__"]}
    if isinstance(v, dict) and "__np__" in v:
        return np.dtype(v["dtype"]).type(v["__np__"])
    if isinstance(v, dict) and "__seq__" in v:
        items = [_decode(x) for x in v["__seq__"]]
        return tuple(items) if v["tuple"] else items
    return v


def _layers(env):
    """The wrappers of one gymnasium env, outermost first, then the env itself."""
    out = [env]
    while hasattr(out[-1], "env"):
        out.append(out[-1].env)
    return out


def _mujoco(env):
    """(model, data) of a gymnasium MuJoCo env, else None."""
    u = env.unwrapped
    model, data = getattr(u, "model", None), getattr(u, "data", None)
    if model is None or type(data).__module__.split(".")[0] != "mujoco":
        return None
    return model, data


# a MuJoCo env's simulator: ``data`` is saved as mj_getState's integration state (time, qpos, qvel,
# act, warm start, controls...: everything mj_step reads); ``model`` is the constant physics
# description, the renderer draws frames only
_MUJOCO_KEYS = {"model", "data", "mujoco_renderer"}
_STRUCTURE_KEYS = {"env", "_saved_kwargs", "_ezpickle_args", "_ezpickle_kwargs"}  # the next layer, constructor args


def unsaved(env) -> list[str]:
    """``Layer.attribute`` of every attribute of ``env``'s layers that a checkpoint would not
    hold and that is not known to be constant (spaces, functions, constructor arguments, a
    MuJoCo model): state a resumed run would lose (an emulator, a deque of frames...)."""
    from gymnasium.spaces import Space

    sim = _mujoco(env) is not None
    out = []
    for layer in _layers(env):
        for k, v in vars(layer).items():
            if (k in _SKIP or k in _STRUCTURE_KEYS or (sim and k in _MUJOCO_KEYS)
                    or isinstance(v, Space) or callable(v) or _encode(v) is not ...):
                continue
            out.append(f"{type(layer).__name__}.{k}")
    return out


WORKER_ENVS = ("save_every needs env_processes: false (the envs' state lives in worker processes); "
               "set save_every=0 or env_processes=false")


def check_saveable(cfg, env=None) -> None:
    """One sentence, before the run starts (preflight), when ``save_every`` could not checkpoint
    ``cfg.env`` (raised at the first save instead, it would end a run that had trained for a
    while). ``env``: one of them to inspect (default: one made and closed here)."""
    if not cfg.save_every:
        return
    if cfg.env_processes:
        raise UserError(WORKER_ENVS)
    from rlhf.gym.envs import make_env

    own = env is None
    env = make_env(cfg.env) if own else env
    try:
        env.reset(seed=0)  # (attributes an env creates at its first reset)
        lost = unsaved(env)
    finally:
        if own:
            env.close()
    if lost:
        raise UserError(f"save_every (resumable checkpoints) cannot save the state of {cfg.env} "
                        f"({', '.join(lost[:3])} {'is' if len(lost) == 1 else 'are'} not plain data), so a "
                        "resumed run would not continue the same episodes; set save_every=0")


def _mj_state(model, data) -> torch.Tensor:
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(model, spec))
    mujoco.mj_getState(model, data, state, spec)
    return torch.from_numpy(state)


def _set_mj_state(model, data, state: torch.Tensor) -> None:
    import mujoco

    mujoco.mj_setState(model, data, state.numpy().copy(), mujoco.mjtState.mjSTATE_INTEGRATION)


# ---------------------------------------------------------------------- envs
def env_state(vec) -> dict:
    """Each sub-env's simulator state (every plain attribute of every wrapper layer: physics
    state, time-limit counter...; a MuJoCo env's integration state), its RNG and its action
    space's RNG; the episode counters. ``check_saveable`` says beforehand whether that is all."""
    if vec.vec is not None:  # (refused by the preflight; here for a loop started without it)
        raise UserError(WORKER_ENVS)
    envs = []
    for e in vec.envs:
        layers = []
        for layer in _layers(e):
            attrs = {k: _encode(v) for k, v in vars(layer).items() if k not in _SKIP}
            layers.append({k: v for k, v in attrs.items() if v is not ...})
        sim = _mujoco(e)
        envs.append({"layers": layers, "rng": e.unwrapped.np_random.bit_generator.state,
                     "action_rng": e.action_space.np_random.bit_generator.state,
                     **({"mujoco": _mj_state(*sim)} if sim else {})})
    return {"envs": envs, "obs": torch.from_numpy(vec.obs.copy()),
            "ep_return": torch.from_numpy(vec.ep_return.copy()), "ep_len": torch.from_numpy(vec.ep_len.copy())}


def set_env_state(vec, s: dict) -> None:
    for e, es in zip(vec.envs, s["envs"], strict=True):
        for layer, attrs in zip(_layers(e), es["layers"], strict=True):
            for k, v in attrs.items():
                setattr(layer, k, _decode(v))
        if "mujoco" in es:
            _set_mj_state(*_mujoco(e), es["mujoco"])
        e.unwrapped.np_random.bit_generator.state = es["rng"]
        e.action_space.np_random.bit_generator.state = es["action_rng"]
    vec.obs = s["obs"].numpy().copy()
    vec.ep_return, vec.ep_len = s["ep_return"].numpy().copy(), s["ep_len"].numpy().copy()
    vec.finished = []


# ---------------------------------------------------------------------- progress, buffer, scaler
def progress_state(bar) -> dict:
    out = {"steps": bar.steps, "next_log": bar.next_log, "returns": list(bar.returns),
           "lengths": list(bar.lengths), "last_return": bar.last_return}
    sel = bar.selector
    if sel is not None:
        out["selector"] = {"next": sel.next, "best": sel.best, "best_step": sel.best_step, "last": sel.last,
                           "state": sel.state}
    return out


def set_progress_state(bar, s: dict) -> None:
    bar.steps, bar.next_log = s["steps"], s["next_log"]
    bar.returns, bar.lengths, bar.last_return = list(s["returns"]), list(s["lengths"]), s["last_return"]
    if bar.selector is not None and "selector" in s:
        x = s["selector"]
        sel = bar.selector
        sel.next, sel.best, sel.best_step, sel.last, sel.state = x["next"], x["best"], x["best_step"], x["last"], x["state"]
    bar.bar.update(bar.steps)


def write_buffer(buffer, path: Path) -> dict:
    """The filled rows of a replay buffer as safetensors; returns its plain-value pointers."""
    from safetensors.torch import save_file

    n = buffer.size
    save_file({k: getattr(buffer, k)[:n].contiguous() for k in ("obs", "next_obs", "actions", "rewards", "terminated")},
              str(path))
    return {"size": buffer.size, "pos": buffer.pos, "capacity": buffer.capacity}


def read_buffer(buffer, path: Path, pointers: dict) -> None:
    from safetensors.torch import load_file

    if pointers["capacity"] != buffer.capacity:
        raise UserError(f"the checkpoint's replay buffer holds {pointers['capacity']} transitions but "
                        f"buffer_size is {buffer.capacity}; resume with --set buffer_size={pointers['capacity']}")
    n = pointers["size"]
    for k, v in load_file(str(path)).items():
        getattr(buffer, k)[:n] = v
    buffer.size, buffer.pos = n, pointers["pos"]


def scaler_state(scaler) -> dict:
    return {"ret": torch.from_numpy(scaler.ret.copy()), "stats": scaler.stats.state_dict()}


def set_scaler_state(scaler, s: dict) -> None:
    scaler.ret = s["ret"].numpy().copy()
    scaler.stats.load_state_dict(s["stats"])


# ---------------------------------------------------------------------- the saver
def _copy(sd: dict) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in sd.items()}


class GymSaver:
    """Checkpoints of one gym loop. ``parts``: {name: object} whose state is saved -- modules and
    optimisers (``state_dict``), ``np.random.Generator``, ``VecEnv``, ``Progress``,
    ``RewardScaler``, ``ReplayBuffer``; ``agent``: the acting network (``policy/``). The loop's
    own values travel as ``counters`` (a dict of tensors and plain values)."""

    def __init__(self, cfg, run, agent, parts: dict):
        self.run, self.every, self.agent, self.parts = run, cfg.save_every, agent, parts
        self.next = self.every
        self.saved_at: int | None = None

    def resume(self) -> dict:
        """Load the newest checkpoint into the parts; return the loop's counters."""
        d = checkpoint.latest(self.run.dir, FOLLOW)
        if d is None or not (d / checkpoint.STATE_FILE).is_file():
            raise UserError(f"{str(self.run.dir)!r} has no checkpoint to resume from (no checkpoint/state.pt); "
                            "gym runs write one every save_every env steps (save_every: 0 saves none)")
        s = checkpoint.read_state(d)
        for name, obj in self.parts.items():
            self._apply(obj, s["parts"][name], d)
        checkpoint.set_rng_state(s)
        self.next, self.saved_at = s["next_save"], s["steps"]
        self.run.truncate_history(s["steps"])
        return s["counters"]

    def maybe(self, steps: int, counters) -> None:
        """Save when ``steps`` reached the next multiple of ``save_every`` (``counters()``: the loop's values)."""
        if self.every and steps >= self.next:
            while self.next <= steps:
                self.next += self.every
            self.save(steps, counters())

    def final(self, steps: int, counters) -> None:
        """The end of the loop: a checkpoint of the last step (unless just saved) when saving is on."""
        if self.every and self.saved_at != steps:
            self.save(steps, counters())

    def save(self, steps: int, counters: dict) -> None:
        from safetensors.torch import save_file

        def writer(d: Path) -> None:
            (d / POLICY_DIR).mkdir()
            save_file(_copy(self.agent.state_dict()), str(d / POLICY_DIR / POLICY_FILE))
            parts = {name: self._capture(obj, d) for name, obj in self.parts.items()}
            checkpoint.write_state(d, {"parts": parts, **checkpoint.rng_state(), "counters": counters,
                                       "steps": steps, "next_save": self.next})

        checkpoint.publish(self.run, steps, writer, follow=FOLLOW)
        self.saved_at = steps

    @staticmethod
    def _capture(obj, d: Path):
        from rlhf.gym.envs import RewardScaler, VecEnv
        from rlhf.gym.progress import Progress
        from rlhf.gym.replay import ReplayBuffer

        if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
            return _copy(obj.state_dict()) if isinstance(obj, torch.nn.Module) else obj.state_dict()
        if isinstance(obj, np.random.Generator):
            return obj.bit_generator.state
        if isinstance(obj, VecEnv):
            return env_state(obj)
        if isinstance(obj, Progress):
            return progress_state(obj)
        if isinstance(obj, RewardScaler):
            return scaler_state(obj)
        if isinstance(obj, ReplayBuffer):
            return write_buffer(obj, d / REPLAY_FILE)
        raise TypeError(f"no checkpoint state for {type(obj).__name__}")

    @staticmethod
    def _apply(obj, s, d: Path) -> None:
        from rlhf.gym.envs import RewardScaler, VecEnv
        from rlhf.gym.progress import Progress
        from rlhf.gym.replay import ReplayBuffer

        if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
            obj.load_state_dict(s)
        elif isinstance(obj, np.random.Generator):
            obj.bit_generator.state = s
        elif isinstance(obj, VecEnv):
            set_env_state(obj, s)
        elif isinstance(obj, Progress):
            set_progress_state(obj, s)
        elif isinstance(obj, RewardScaler):
            set_scaler_state(obj, s)
        elif isinstance(obj, ReplayBuffer):
            read_buffer(obj, d / REPLAY_FILE, s)
        else:
            raise TypeError(f"no checkpoint state for {type(obj).__name__}")

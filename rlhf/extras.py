"""The optional packages a recipe can need beyond a plain ``pip install rlhf``, and the one pip
line that brings each (an extra of pyproject.toml), so that a missing one stops the preflight in
one sentence before a run directory exists, not a traceback minutes into the run.

What needs what: a reward names its packages as ``fn.requires`` (``rewards.math.math_correct``:
math_verify); an env needs its gymnasium family's simulator (``env_packages``); a tracker its own
package (``rlhf.tracking.TRACKERS``).
"""
from __future__ import annotations

import importlib.util

from rlhf.errors import UserError

# module imported -> (the distribution that provides it, the pip line that brings it)
EXTRAS = {
    "math_verify": ("math-verify", "pip install 'rlhf[math]'"),
    "Box2D": ("box2d", "pip install 'rlhf[box2d]'"),
    "mujoco": ("mujoco", "pip install 'rlhf[mujoco]'"),
    "ale_py": ("ale-py", "pip install 'rlhf[atari]'"),
    "cv2": ("opencv-python-headless", "pip install 'rlhf[atari]'"),
    "minatar": ("minatar", "pip install 'rlhf[minatar]'"),
}
# env id prefix -> modules (pixel envs that their package registers on import)
ENV_PREFIXES = {"ALE/": ("ale_py", "cv2"), "MinAtar/": ("minatar",)}
# gymnasium's own env families that import a simulator: the package of the entry point -> modules
ENV_FAMILIES = {"gymnasium.envs.box2d": ("Box2D",), "gymnasium.envs.mujoco": ("mujoco",), "ale_py": ("ale_py", "cv2")}


def install_line(module: str) -> str:
    """The pip line that brings ``module`` (``pip install MODULE`` for one not listed here)."""
    return EXTRAS.get(module, (module, f"pip install {module}"))[1]


def require(modules, who: str) -> None:
    """Each of ``modules`` is importable here, or one sentence saying that ``who`` needs it and how
    to install it (found without importing it: a check must not start a simulator)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            dist = EXTRAS.get(module, (module,))[0]
            raise UserError(f"{who} needs the {dist} package, which is not installed here; run `"
                            f"{install_line(module)}`")


def env_packages(env_id: str) -> tuple[str, ...]:
    """The optional modules env ``env_id`` needs (() for the classic-control and toy-text envs,
    which come with gymnasium, and for ids gymnasium does not know: the env check names those)."""
    import gymnasium as gym

    for prefix, modules in ENV_PREFIXES.items():
        if env_id.startswith(prefix):
            return modules
    if env_id.endswith("NoFrameskip-v4") and env_id not in gym.envs.registry:  # registered by ale-py
        return ENV_FAMILIES["ale_py"]
    entry = gym.envs.registry[env_id].entry_point if env_id in gym.envs.registry else ""
    entry = entry if isinstance(entry, str) else getattr(entry, "__module__", "")
    for package, modules in ENV_FAMILIES.items():
        if entry == package or entry.startswith((package + ".", package + ":")):
            return modules
    return ()

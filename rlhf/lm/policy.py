"""LMPolicy: a causal LM with a LoRA adapter (and PPO's value head): loading it, placing it
across devices and processes, its module modes, saving it.

What it does with the model lives beside it: ``rlhf.lm.sampler`` writes completions (the
decode loop, over ``rlhf.lm.kv_cache``), ``rlhf.lm.forward`` is the training forward (log-probs,
values, entropy of given ids), ``rlhf.lm.prompts`` renders and tokenises prompts, and
``rlhf.lm.rollout_record`` is the record that passes between them. ``LMPolicy`` holds the
settings they share and calls them in the right mode.

Shapes: P prompts, G completions each, N = P * G rows, Lp prompt length (left-padded),
C completion length (right-padded after EOS). The reference policy is the same weights with
the adapter disabled, so it costs no second copy of the model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlhf.core.logprobs import Truncation
from rlhf.distributed import DATA_PARALLEL
from rlhf.errors import UserError
from rlhf.lm import fast_lora
from rlhf.lm.forward import PolicyNet
from rlhf.lm.precision import resolve_dtype
from rlhf.lm.prompts import decode_completions, render_prompt, tokenize_prompts
from rlhf.lm.rollout_record import Rollout
from rlhf.lm.sampler import DecodeSettings, eos_ids
from rlhf.lm.share import make_portable
from rlhf.lm.static_decode import decode_engine


VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"  # the separate critic's adapter, inside the policy's adapter directory


def load_tokenizer(model_path: str):
    """The model's tokenizer, padding on the left (prompts end where generation starts), its
    end token as the padding token where it has none."""
    import transformers

    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_adapted(model_path: str, dtype: str, lora, saved: Path | None):
    """The base model (its weights in ``dtype``) with a LoRA adapter: the saved one at ``saved``,
    or a fresh one of config ``lora``; its LoRA layers on the cheaper forward (``fast_lora``)."""
    import transformers
    from peft import PeftModel, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    if getattr(base.config, "quantization_config", None) is not None:
        raise UserError(f"checkpoint {model_path} is marked as quantised; re-save it without "
                        "quantization_config (rlhf model pull does this) to train it")
    if saved is None:
        model = get_peft_model(base, lora)
    elif not (saved / "adapter_config.json").is_file():
        raise UserError(f"no LoRA adapter in {str(saved)!r} (adapter_config.json is missing); "
                        "point at a run's adapter/ directory")
    else:
        model = PeftModel.from_pretrained(base, str(saved), is_trainable=True)
    fast_lora.install(model)
    return model


def load_value_head(hidden_size: int, saved: Path | None) -> torch.nn.Linear:
    """PPO's value head: a scalar linear head, zero at the start, or as saved beside the adapter."""
    head = torch.nn.Linear(hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    if saved and (saved / VALUE_HEAD_FILE).is_file():
        head.load_state_dict(load_file(saved / VALUE_HEAD_FILE))
    return head


class LMPolicy:
    """Causal LM + LoRA. ``generate`` collects, ``logp`` is what the loss needs.

    ``dtype``: the frozen base weights' precision, float32, bfloat16 or auto (bf16 where
    ``device``, the device the policy will run on, default the CPU it is loaded on, computes it
    faster; ``self.dtype`` is the choice). Under bf16 the adapter, its gradients and optimiser
    state, the log-softmax, the log-probs and the loss stay fp32 (rlhf/lm/precision.py)."""

    def __init__(self, model_path: str, *, lora_r: int = 16, lora_alpha: int = 32,
                 lora_dropout: float = 0.0, lora_targets: str | list[str] = "all-linear",
                 dtype: str = "float32", temperature: float = 1.0, adapter_path: str | None = None,
                 value_head: bool = False, critic: str = "shared", gradient_checkpointing: bool = False,
                 disable_dropout: bool = True, device: torch.device | str | None = None):
        from peft import LoraConfig

        if critic not in ("shared", "separate"):
            raise UserError(f"critic must be 'shared' (value head on the policy's trunk) or 'separate' "
                            f"(its own LoRA adapter on a second copy of the base), got {critic!r}")
        self.temperature = temperature
        self.tokenizer = load_tokenizer(model_path)
        self.dtype = resolve_dtype(dtype, device or "cpu")  # the base weights' (LoRA stays fp32: rlhf/lm/precision.py)
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=lora_targets, task_type="CAUSAL_LM")
        saved = adapter_path and Path(adapter_path)
        self.model = load_adapted(model_path, self.dtype, lora, saved)
        self.eos_ids = eos_ids(self.tokenizer, self.model)
        # PPO's critic: a scalar head on the final hidden state of the policy's LoRA-adapted
        # trunk (shared), or of a second LoRA-adapted copy of the base (separate)
        self.value_head, self.critic_model = None, None
        if value_head:
            self.value_head = load_value_head(self.model.config.hidden_size, saved)
            if critic == "separate":
                self.critic_model = load_adapted(model_path, self.dtype, lora, saved / CRITIC_DIR if saved else None)
        # what gets gradients, as one module: one forward call per optimiser step, so DDP can
        # wrap it (``distribute``) even though a forward runs the LM several times
        shared = self.critic_model is None
        self.net = PolicyNet(self.model, self.value_head if shared else None, temperature)
        self.critic_net = None if shared else PolicyNet(self.critic_model, self.value_head, temperature)
        self.train_net: torch.nn.Module = self.net
        self.train_critic: torch.nn.Module | None = self.critic_net
        self.sampling_context = contextlib.nullcontext
        # sampling folds the adapter into fp32 weights (fast_lora.merged): one GEMM per layer
        self.merge_for_sampling, self._merged_weights = True, {}
        self.disable_dropout = disable_dropout
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self.eval_mode()  # (from_pretrained/peft leave modules in train mode) every phase sets its own

    # ------------------------------------------------------------------ module modes
    def _nets(self) -> list[torch.nn.Module]:
        return [n for n in (self.net, self.critic_net) if n is not None]

    def eval_mode(self) -> None:
        """The mode of the passes that only read the policy: sampling, the reference's and the
        rollout policy's log-probs, values for GAE. Every module is in eval mode, so no
        dropout (LoRA's, the base model's) perturbs them: they are the policy's log-probs."""
        for net in self._nets():
            net.eval()

    def update_mode(self) -> None:
        """The mode of the gradient passes.

        ``disable_dropout`` (the default, as TRL's GRPO/PPO): every module stays in eval mode, so
        the update differentiates exactly the policy that sampled the rollout and that the
        no-grad passes scored. With dropout active the update's log-probs are those of a random
        sub-network: the ratio to the rollout's log-probs is not 1 on-policy, so clipping and
        ``approx_kl`` measure dropout noise and the KL term compares a noisy policy to the
        reference. Dropout's regularisation buys little in RL (the data is fresh every step).
        With gradient checkpointing on, the checkpointed decoder layers themselves are flagged
        training, since HF recomputes a layer only then; their submodules (attention, MLP, LoRA
        dropout) stay in eval mode. (A model whose decoder layer applies dropout in its own
        forward, as OPT's does, would then keep that one.)

        ``disable_dropout: false`` opts in to dropout in the update: the whole module trains.
        """
        from transformers.modeling_layers import GradientCheckpointingLayer

        for net in self._nets():
            if not self.disable_dropout:
                net.train()
                continue
            net.eval()
            for m in net.modules():
                if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
                    m.training = True  # this module only (``train()`` would recurse)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer's activations in the backward pass instead of keeping them:
        less memory, ~30% more compute. Checkpointed layers cannot return a KV cache, so the
        training forward then runs each row's prompt + completion as one sequence."""
        for net in filter(None, (self.net, self.critic_net)):
            net.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            net.full_sequence = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "LMPolicy":
        """Move every module (one process: evaluation; the trainer places them with ``distribute``)."""
        for net in self._nets():
            net.to(device)
        return self

    def distribute(self, dist, optimizer, max_grad_norm: float | None = None):
        """Place the trainable module(s) and their optimiser with ``dist`` (rlhf.distributed:
        device, DDP, FSDP2 or DeepSpeed); returns the optimiser to step. Sampling then runs
        with the parameters whole (``dist.full_params``)."""
        if self.critic_net is not None and dist.kind not in DATA_PARALLEL:
            raise UserError(f"critic: separate is not supported under {dist.kind} (accelerate prepares one "
                            "model per run there); use critic: shared")
        if self.dtype == "float16":  # float16's range needs a loss scaler (_step in the trainer)
            if dist.kind not in DATA_PARALLEL:
                raise UserError(f"dtype: float16 trains with a loss scaler in one process or under DDP, not "
                                f"under {dist.kind}; use dtype: bfloat16 there")
            self.scaler = torch.amp.GradScaler(dist.device.type)
        if self.critic_net is not None:
            self.train_critic = dist.wrap(self.critic_net)
        if dist.kind not in DATA_PARALLEL:  # sharded or engine-managed weights: never swapped
            self.merge_for_sampling = False
        if dist.zero_stage == 3:  # ZeRO-3 gathers a weight in its module's forward, so run every module's
            fast_lora.uninstall(self.model)
            self.net.fused_head = False
        self.train_net, optimizer = dist.prepare(self.net, optimizer, max_grad_norm)
        self.sampling_context = lambda: dist.full_params(self.train_net)
        return optimizer

    scaler: torch.amp.GradScaler | None = None  # dtype float16: the loss scaler (``distribute``)

    # ------------------------------------------------------------------ options
    # prompts: extra apply_chat_template arguments; keep the last N prompt tokens (0: all)
    chat_template_kwargs: dict | None = None
    max_prompt_length: int = 0
    prompts_seen = prompts_truncated = 0  # counts of encode_prompts, for the run's metrics
    # generation: truncation of the sampling distribution (log-probs use it too), stop strings
    truncation: Truncation = Truncation()
    stop: tuple[str, ...] = ()
    decode_mode: str = "auto"  # the decode path: auto | dynamic | static (rlhf/lm/static_decode.py)

    def set_options(self, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, stop=(),
                    chat_template_kwargs: dict | None = None, max_prompt_length: int = 0,
                    decode: str = "auto") -> None:
        """The recipe's prompt and generation options (LMConfig's keys of the same names)."""
        self.decode_mode = decode
        self.truncation = Truncation(top_k, top_p, min_p)
        for net in filter(None, (self.net, self.critic_net)):
            net.truncation = self.truncation
        self.stop = tuple(stop)
        self.chat_template_kwargs, self.max_prompt_length = dict(chat_template_kwargs or {}), max_prompt_length

    # ------------------------------------------------------------------ prompts (rlhf/lm/prompts.py)
    def encode_prompts(self, prompts: list) -> tuple[Tensor, Tensor]:
        """Chat-template conversational prompts (lists of messages), tokenize, keep the last
        ``max_prompt_length`` tokens of longer ones (counted in ``prompts_truncated``), left-pad."""
        texts = [self.apply_template(p) for p in prompts]
        ids, mask, cut = tokenize_prompts(self.tokenizer, texts, self.max_prompt_length)
        self.prompts_seen += len(texts)
        self.prompts_truncated += cut
        return ids.to(self.device), mask.to(self.device)

    def apply_template(self, prompt) -> str:
        return render_prompt(self.tokenizer, prompt, self.chat_template_kwargs)

    def decode(self, completion_ids: Tensor, mask: Tensor) -> list[str]:
        return decode_completions(self.tokenizer, completion_ids, mask)

    # ------------------------------------------------------------------ sampling (rlhf/lm/sampler.py)
    def decode_settings(self) -> DecodeSettings:
        """The sampler's settings as this policy's options set them."""
        return DecodeSettings(self.temperature, self.truncation, tuple(self.eos_ids), self.tokenizer.pad_token_id,
                              self.stop, self.tokenizer)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int,
                 max_new_tokens: int, greedy: bool = False, adapter: bool = True,
                 uniforms: Tensor | None = None) -> Rollout:
        """Sample ``group_size`` completions per prompt (a group's rows are contiguous);
        ``greedy`` takes the argmax instead; ``adapter=False`` samples the reference.
        ``uniforms`` [N, max_new_tokens] in [0, 1) are the random numbers of each row's draws
        (default: torch's global generator). Samples in eval mode (``eval_mode``), with the
        parameters whole and the adapter folded into the weights where it can be."""
        self.eval_mode()
        merge = adapter and self.merge_for_sampling
        with (self.sampling_context(), self._adapter(adapter),
              fast_lora.merged(self.model, self._merged_weights) if merge else contextlib.nullcontext()):
            return decode_engine(self.decode_mode, self.device)(
                self.model, prompt_ids, prompt_mask, group_size, max_new_tokens, self.decode_settings(),
                greedy, uniforms)

    # ------------------------------------------------------------------ log-probs
    def logp(self, batch: Rollout, adapter: bool = True) -> Tensor:
        """Log-probs [N, C] of the completion tokens (``adapter=False``: the reference)."""
        return self.forward(batch, adapter)["logp"]

    def forward(self, batch: Rollout, adapter: bool = True, values: bool = False,
                entropy: bool = False) -> dict[str, Tensor]:
        """``logp`` [N, C] of the completion tokens at the sampling temperature; with
        ``values`` the value head's V(s_t) [N, C] for the state before each token; with
        ``entropy`` the policy entropy per position [N, C] (detached). Zero past each row's end.
        See ``PolicyNet.forward``."""
        args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.mask)
        kw = {"group_size": batch.group_size, "attn_mask": batch.attn_mask}
        out = self.train_net(*args, **kw, adapter=adapter, values=values, entropy=entropy)
        if values and self.train_critic is not None:  # the separate critic's own pass
            out["values"] = self.train_critic(*args, **kw, values=True, logp=False)["values"]
        return out

    def _adapter(self, enabled: bool):
        return contextlib.nullcontext() if enabled else self.model.disable_adapter()

    # ------------------------------------------------------------------ weights
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.critic_model is not None:
            params += [p for p in self.critic_model.parameters() if p.requires_grad]
        return params + (list(self.value_head.parameters()) if self.value_head is not None else [])

    def full_trainable(self, dist) -> dict[str, Tensor]:
        """The policy module's trainable tensors, whole and on the CPU, by name (``model.…``,
        ``value_head.…``): a collective where they are sharded, so every rank calls it."""
        return dist.full_tensors([(n, p) for n, p in self.net.named_parameters() if p.requires_grad])

    def adapter_norm(self, full: dict[str, Tensor] | None = None) -> float:
        """L2 norm of the LoRA B matrices: 0 at init, so 0 after training means nothing moved.
        ``full``: ``full_trainable``'s tensors (needed where the parameters are sharded)."""
        named = full.items() if full is not None else self.model.named_parameters()
        sq = sum(float((p.detach().float() ** 2).sum()) for n, p in named if "lora_B" in n)
        return sq ** 0.5

    def save_adapter(self, path, full: dict[str, Tensor] | None = None) -> None:
        """PEFT-format adapter (plus ``value_head.safetensors`` when there is a value head, and
        the separate critic's adapter in ``critic/``). ``full``: ``full_trainable``'s tensors,
        written instead of the module's own (which may be shards)."""
        if full is None:
            self.model.save_pretrained(str(path), safe_serialization=True)
            if self.value_head is not None:
                save_file(self.value_head.state_dict(), str(Path(path) / VALUE_HEAD_FILE))
        else:
            part = {k: {n[len(k) + 1:]: v for n, v in full.items() if n.startswith(k + ".")}
                    for k in ("model", "value_head")}
            self.model.save_pretrained(str(path), safe_serialization=True, state_dict=part["model"])
            if self.value_head is not None:
                save_file(part["value_head"], str(Path(path) / VALUE_HEAD_FILE))
        if self.critic_model is not None:
            self.critic_model.save_pretrained(str(Path(path) / CRITIC_DIR), safe_serialization=True)
        # portable: the base's Hub id in adapter_config.json, the tokenizer and chat template beside it
        make_portable(path, self.model.get_base_model().config._name_or_path, self.tokenizer)

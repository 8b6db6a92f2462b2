"""An LM policy: a causal LM with a LoRA adapter, turned into token log-probs.

Shapes: P prompts, G completions each, N = P * G rows, Lp prompt length (left-padded),
C completion length (right-padded after EOS). The reference policy is the same weights with
the adapter disabled, so it costs no second copy of the model.

Both sampling and the training forward run each prompt through the model once and repeat
its KV cache for the G completions of its group: on the addition task the prompt is ~2/3
of every sequence, so this cuts the work of a step by about half.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rlhf.core import entropy_from_logits, linear_logprobs, sample_categorical, selective_log_softmax
from rlhf.core.logprobs import Truncation, truncated_linear_logprobs, truncation_mask, wide_dtype
from rlhf.distributed import DATA_PARALLEL
from rlhf.errors import UserError
from rlhf.lm import fast_lora
from rlhf.lm.precision import resolve_dtype
from rlhf.lm.share import make_portable


VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"  # the separate critic's adapter, inside the policy's adapter directory


@dataclass
class Rollout:
    """One batch of sampled completions (the LM's version of a gym rollout buffer).

    Prompts are stored once per group: completion row ``i`` belongs to prompt ``i // group_size``.
    """

    prompt_ids: Tensor        # [P, Lp] left-padded
    prompt_mask: Tensor       # [P, Lp]
    completion_ids: Tensor    # [N, C] right-padded, N = P * group_size
    mask: Tensor              # [N, C] 1 on real completion tokens (EOS included)
    truncated: Tensor         # [N] bool: hit max_new_tokens without EOS
    group_size: int = 1
    rollout_logp: Tensor | None = None  # [N, C] log-probs as seen while sampling

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select_groups(self, groups: Tensor) -> "Rollout":
        """The sub-rollout made of whole groups (prompt indices ``groups``)."""
        rows = self.rows_of(groups)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Rollout(self.prompt_ids[groups], self.prompt_mask[groups], pick(self.completion_ids),
                       pick(self.mask), pick(self.truncated), self.group_size, pick(self.rollout_logp))

    def rows_of(self, groups: Tensor) -> Tensor:
        """Completion rows of the prompts ``groups``."""
        return (groups[:, None] * self.group_size + torch.arange(self.group_size, device=groups.device)).reshape(-1)


class InPlaceLayer(DynamicLayer):
    """A KV-cache layer for decoding whose keys and values live in a buffer with room for
    ``extra`` more tokens: each step writes its slot, where transformers' DynamicLayer
    concatenates (copies) the whole cache of every layer at every step."""

    def __init__(self, layer: DynamicLayer, extra: int):
        super().__init__()
        k, v = layer.keys, layer.values
        b, h, n, d = k.shape
        self.kbuf, self.vbuf = k.new_empty(b, h, n + extra, d), v.new_empty(b, h, n + extra, d)
        self.kbuf[:, :, :n], self.vbuf[:, :, :n] = k, v
        self.n = n
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.kbuf[:, :, :self.n], self.vbuf[:, :, :self.n]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        m = self.n + key_states.shape[-2]
        self.kbuf[:, :, self.n:m] = key_states
        self.vbuf[:, :, self.n:m] = value_states
        self.n = m
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.kbuf = self.kbuf.repeat_interleave(repeats, 0)
        self.vbuf = self.vbuf.repeat_interleave(repeats, 0)
        self._views()


class LMPolicy:
    """Causal LM + LoRA. ``generate`` collects, ``logp`` is what the loss needs.

    ``dtype``: the frozen base weights' precision, float32, bfloat16 or auto (bf16 where
    ``device``, the device the policy will run on, default the CPU it is loaded on, computes it
    faster; ``self.dtype`` is the choice). Under bf16 the adapter, its gradients and optimiser state, the log-softmax, the
    log-probs and the loss stay fp32 (rlhf/lm/precision.py)."""

    def __init__(self, model_path: str, *, lora_r: int = 16, lora_alpha: int = 32,
                 lora_dropout: float = 0.0, lora_targets: str | list[str] = "all-linear",
                 dtype: str = "float32", temperature: float = 1.0, adapter_path: str | None = None,
                 value_head: bool = False, critic: str = "shared", gradient_checkpointing: bool = False,
                 disable_dropout: bool = True, device: torch.device | str | None = None):
        import transformers
        from peft import LoraConfig, PeftModel, get_peft_model

        transformers.logging.set_verbosity_error()
        self.temperature = temperature
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dtype = resolve_dtype(dtype, device or "cpu")  # the base weights' (LoRA stays fp32: rlhf/lm/precision.py)
        torch_dtype = getattr(torch, self.dtype)
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=lora_targets, task_type="CAUSAL_LM")

        def adapted(saved: Path | None):
            """The base model with a LoRA adapter: the saved one at ``saved``, or a fresh one."""
            base = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
            if getattr(base.config, "quantization_config", None) is not None:
                raise UserError(f"checkpoint {model_path} is marked as quantised; re-save it without "
                                "quantization_config (rlhf model pull does this) to train it")
            if saved is None:
                return get_peft_model(base, lora)
            if not (saved / "adapter_config.json").is_file():
                raise UserError(f"no LoRA adapter in {str(saved)!r} (adapter_config.json is missing); "
                                "point at a run's adapter/ directory")
            return PeftModel.from_pretrained(base, str(saved), is_trainable=True)

        if critic not in ("shared", "separate"):
            raise UserError(f"critic must be 'shared' (value head on the policy's trunk) or 'separate' "
                            f"(its own LoRA adapter on a second copy of the base), got {critic!r}")
        self.model = adapted(adapter_path and Path(adapter_path))
        fast_lora.install(self.model)
        self.eos_ids = _eos_ids(self.tokenizer, self.model)
        # PPO's critic: a scalar head on the final hidden state of the policy's LoRA-adapted
        # trunk (shared), or of a second LoRA-adapted copy of the base (separate)
        self.value_head, self.critic_model = None, None
        if value_head:
            self.value_head = torch.nn.Linear(self.model.config.hidden_size, 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
            saved = adapter_path and Path(adapter_path) / VALUE_HEAD_FILE
            if saved and saved.is_file():
                self.value_head.load_state_dict(load_file(saved))
            if critic == "separate":
                self.critic_model = adapted(Path(adapter_path) / CRITIC_DIR if adapter_path else None)
                fast_lora.install(self.critic_model)
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

    def set_options(self, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, stop=(),
                    chat_template_kwargs: dict | None = None, max_prompt_length: int = 0) -> None:
        """The recipe's prompt and generation options (LMConfig's keys of the same names)."""
        self.truncation = Truncation(top_k, top_p, min_p)
        for net in filter(None, (self.net, self.critic_net)):
            net.truncation = self.truncation
        self.stop = tuple(stop)
        self.chat_template_kwargs, self.max_prompt_length = dict(chat_template_kwargs or {}), max_prompt_length

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: list) -> tuple[Tensor, Tensor]:
        """Chat-template conversational prompts (lists of messages), tokenize, keep the last
        ``max_prompt_length`` tokens of longer ones (counted in ``prompts_truncated``), left-pad."""
        texts = [self.apply_template(p) for p in prompts]
        if not self.max_prompt_length:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            self.prompts_seen += len(texts)
            return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        ids = self.tokenizer(texts, add_special_tokens=False).input_ids
        self.prompts_seen += len(ids)
        self.prompts_truncated += sum(len(x) > self.max_prompt_length for x in ids)
        ids = [x[-self.max_prompt_length:] for x in ids]
        enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def apply_template(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if self.tokenizer.chat_template is None:
            raise UserError("the prompts are conversations but the tokenizer has no chat template; "
                            "use plain-text prompts or a model with a chat template")
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                                  **(self.chat_template_kwargs or {}))

    def decode(self, completion_ids: Tensor, mask: Tensor) -> list[str]:
        return [self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                for ids, m in zip(completion_ids, mask)]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int,
                 max_new_tokens: int, greedy: bool = False, adapter: bool = True,
                 uniforms: Tensor | None = None) -> Rollout:
        """Sample ``group_size`` completions per prompt (a group's rows are contiguous);
        ``greedy`` takes the argmax instead; ``adapter=False`` samples the reference.
        ``uniforms`` [N, max_new_tokens] in [0, 1) are the random numbers of each row's draws
        (default: torch's global generator). Rows that have emitted EOS leave the batch, so
        later tokens cost only live rows. Samples in eval mode (``eval_mode``)."""
        self.eval_mode()
        merge = adapter and self.merge_for_sampling
        with (self.sampling_context(), self._adapter(adapter),
              fast_lora.merged(self.model, self._merged_weights) if merge else contextlib.nullcontext()):
            return self._decode(prompt_ids, prompt_mask, group_size, max_new_tokens, greedy, uniforms)

    def _decode(self, prompt_ids, prompt_mask, g, max_new_tokens, greedy, uniforms) -> Rollout:
        n, dev = prompt_ids.shape[0] * g, prompt_ids.device
        pad, eos = self.tokenizer.pad_token_id, torch.tensor(self.eos_ids, device=dev)
        tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=dev)
        logps = torch.zeros(n, max_new_tokens, device=dev)
        if uniforms is not None:  # (float64 from the CPU's generators: float32 on an accelerator)
            uniforms = uniforms.to(dev, wide_dtype(dev))
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=positions(prompt_mask), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(g)
        cache.layers = [InPlaceLayer(layer, max_new_tokens) for layer in cache.layers]
        logits = out.logits[:, -1].repeat_interleave(g, 0)
        attn = prompt_mask.repeat_interleave(g, 0)
        live = torch.arange(n, device=dev)  # rows still generating
        stopped = torch.full((n,), -1, dtype=torch.long)  # where a stop string ended a row
        steps = 0
        for t in range(max_new_tokens):
            x = logits.float()
            if self.temperature != 1.0:
                x = x / self.temperature
            top = x.amax(-1, keepdim=True)
            e = torch.exp(x - top)  # unnormalised probabilities
            if self.truncation.active:  # top_k / top_p / min_p: the rest get probability 0
                e = e * truncation_mask(x, self.truncation)
            nxt = x.argmax(-1) if greedy else sample_categorical(
                e, uniform=None if uniforms is None else uniforms[live, t])
            tokens[live, t] = nxt
            logps[live, t] = x.gather(-1, nxt[:, None]).squeeze(-1) - top.squeeze(-1) - e.sum(-1).log()
            steps = t + 1
            ended = torch.isin(nxt, eos)
            if self.stop:
                ended = ended | self._stopped(tokens, live, t, stopped)
            if t == max_new_tokens - 1 or bool(ended.all()):
                break
            if bool(ended.any()):  # drop finished rows from the batch and the cache
                keep = (~ended).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                live, nxt, attn = live[keep], nxt[keep], attn[keep]
            attn = torch.cat([attn, torch.ones(len(live), 1, dtype=attn.dtype, device=dev)], dim=1)
            out = self.model(input_ids=nxt[:, None], attention_mask=attn, past_key_values=cache,
                             position_ids=attn.sum(-1, keepdim=True) - 1, use_cache=True)
            logits = out.logits[:, -1]
        tokens, logps = tokens[:, :steps], logps[:, :steps]
        mask, truncated = completion_mask(tokens, self.eos_ids)
        if self.stop and bool((stopped >= 0).any()):  # tokens after a stop string's last one
            rows = (stopped >= 0).nonzero().squeeze(-1)
            after = torch.arange(steps)[None, :] > stopped[rows, None]
            mask[rows.to(dev)] = mask[rows.to(dev)] * (~after).to(dev, mask.dtype)
            truncated[rows.to(dev)] = False
        return Rollout(prompt_ids, prompt_mask, tokens, mask, truncated, g, logps * mask)

    def _stopped(self, tokens: Tensor, live: Tensor, t: int, stopped: Tensor) -> Tensor:
        """Bool [len(live)]: the token just sampled (position ``t``) completes a stop string in
        its row; records ``t`` in ``stopped``. Decodes only the last few tokens: enough for the
        longest stop string (a token is at least one byte, a character at most four)."""
        width = 4 * max(len(s) for s in self.stop) + 1
        tails = self.tokenizer.batch_decode(tokens[live, max(0, t - width + 1):t + 1].tolist())
        hit = torch.tensor([any(s in text for s in self.stop) for text in tails], dtype=torch.bool)
        stopped[live.cpu()[hit]] = t
        return hit.to(live.device)

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
        out = self.train_net(*args, group_size=batch.group_size, adapter=adapter, values=values, entropy=entropy)
        if values and self.train_critic is not None:  # the separate critic's own pass
            out["values"] = self.train_critic(*args, group_size=batch.group_size, values=True, logp=False)["values"]
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


class PolicyNet(torch.nn.Module):
    """The modules that get gradients (LoRA-adapted LM, optional value head) and the training
    forward over a rollout, as one ``nn.Module`` call."""

    def __init__(self, model, value_head, temperature: float):
        super().__init__()
        self.model, self.value_head, self.temperature = model, value_head, temperature
        # the blocks FSDP shards one by one (accelerate's transformer-based wrap policy reads it)
        self._no_split_modules = getattr(model.get_base_model(), "_no_split_modules", None)
        self.full_sequence = False  # set by gradient checkpointing (no KV cache to share)
        self.truncation = Truncation()  # the sampler's top_k / top_p / min_p (LMPolicy.set_options)
        self.fused_head = True      # LM head + log-softmax in blocks (reads the head's weight directly)
        # what the model's own head does after its linear layer (Cohere, Granite, Gemma-2/3): the
        # sampler sees those logits (``model(...).logits``), so the training log-probs must too
        self.logit_scale, self.logit_softcap = logit_transform(model.config)

    def forward(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, mask: Tensor,
                group_size: int = 1, adapter: bool = True, values: bool = False,
                entropy: bool = False, logp: bool = True, owner: Tensor | None = None) -> dict[str, Tensor]:
        """``logp=False`` (a separate critic): values only, the LM head is skipped. ``owner`` [N]:
        the prompt of each completion row (default: a group's ``group_size`` rows are contiguous).

        Each prompt runs once. Its KV cache (autograd graph included) is gathered for the rows
        of its group, and the completions run on top, in up to two buckets of similar length
        so short answers do not pay for the longest one's padding. The LM head runs only on
        the completion tokens themselves (never on the prompt or padding), fused with the
        log-softmax in blocks of rows (``linear_logprobs``).
        """
        want_hidden = values and self.value_head is not None
        c = completion_ids.shape[1]
        if owner is None:
            owner = torch.div(torch.arange(len(completion_ids), device=completion_ids.device), group_size,
                              rounding_mode="floor")
        decoder = self.model.get_base_model().get_decoder()
        with contextlib.nullcontext() if adapter else self.model.disable_adapter():
            if self.full_sequence:  # one plain pass over each row's prompt + completion
                ids = torch.cat([prompt_ids[owner], completion_ids], 1)
                attn = torch.cat([prompt_mask[owner], mask.to(prompt_mask.dtype)], 1)
                res = decoder(input_ids=ids, attention_mask=attn, position_ids=positions(attn))
                hidden = res.last_hidden_state[:, -c - 1:-1]  # position i predicts completion token i
            else:
                prompt = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                                 position_ids=positions(prompt_mask), use_cache=True)
                parts, order = [], []
                for rows, width in length_buckets(mask):
                    part = self._completions(decoder, prompt, prompt_mask, completion_ids, mask, owner[rows],
                                             rows, width)
                    parts.append(F.pad(part, (0, 0, 0, c - width)))
                    order.append(rows)
                hidden = torch.cat(parts)[torch.argsort(torch.cat(order))]  # back to the rollout's order
        # the policy's log-probs use the sampler's truncated distribution; the reference's full one
        trunc = self.truncation if adapter else Truncation()
        return self._outputs(hidden, completion_ids, mask, want_hidden, entropy, logp, trunc)

    def _completions(self, decoder, prompt, prompt_mask, completion_ids, mask, owner, rows, width):
        """Final hidden states [n, width, d] of the positions that predict completion ``rows``'
        tokens (``owner``: their prompts), run on top of their prompts' cached keys and values."""
        hidden = prompt.last_hidden_state[owner, -1:]                       # predicts token 0
        if width == 1:
            return hidden
        cache = DynamicCache(ddp_cache_data=[(k[owner], v[owner]) for k, v, *_ in prompt.past_key_values],
                             config=self.model.config)
        p_mask = prompt_mask[owner]
        attn = torch.cat([p_mask, mask[rows, :width - 1]], dim=1)
        rest = decoder(input_ids=completion_ids[rows, :width - 1], attention_mask=attn, past_key_values=cache,
                       use_cache=True, position_ids=p_mask.sum(-1, keepdim=True)
                       + torch.arange(width - 1, device=p_mask.device))
        return torch.cat([hidden, rest.last_hidden_state], dim=1)

    def _outputs(self, hidden: Tensor, completion_ids: Tensor, mask: Tensor, values: bool, entropy: bool,
                 logp: bool, trunc: Truncation = Truncation()) -> dict[str, Tensor]:
        """Log-probs (and entropy) of the completion tokens, values, from the hidden states
        [N, C, d] that predict them; zero past each row's end."""
        out = {}
        if logp:
            real = mask.bool()
            lp, ent = self._head(hidden[real], completion_ids[real], entropy, trunc)
            out["logp"] = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).index_put((real,), lp)
            if entropy:
                out["entropy"] = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).index_put((real,), ent)
        if values:
            out["values"] = self.value_head(hidden.float()).squeeze(-1) * mask
        return out

    def _head(self, hidden: Tensor, ids: Tensor, entropy: bool, trunc: Truncation = Truncation()
              ) -> tuple[Tensor, Tensor | None]:
        """Log-probs [M] of ``ids`` at the sampling temperature (and entropies) from hidden [M, d],
        under the distribution truncated by ``trunc`` (renormalised over the kept tokens)."""
        head = self.model.get_base_model().get_output_embeddings()
        # fused: a plain linear head, and no soft-capping (a scale folds into the temperature)
        fused = self.fused_head and type(head) is torch.nn.Linear and head.bias is None and not self.logit_softcap
        temperature = self.temperature / self.logit_scale
        if trunc.active and fused:
            return truncated_linear_logprobs(hidden, head.weight, ids, temperature, trunc, entropy=entropy)
        if trunc.active:  # an adapted or biased head, or capped logits: full logits, masked as the sampler does
            logits = self._logits(head, hidden) / self.temperature
            keep = truncation_mask(logits.detach(), trunc)
            keep[torch.arange(len(ids), device=ids.device), ids] = True
            logits = logits.masked_fill(~keep, float("-inf"))
            ent = None
            if entropy:
                lp_all = torch.log_softmax(logits.detach(), -1)
                ent = -(lp_all.exp() * lp_all.masked_fill(~keep, 0.0)).sum(-1)
            return selective_log_softmax(logits, ids), ent
        if fused:  # in blocks
            return linear_logprobs(hidden, head.weight, ids, temperature, entropy=entropy)
        logits = self._logits(head, hidden) / self.temperature       # an adapted or biased head, or capped logits
        ent = entropy_from_logits(logits.detach()) if entropy else None
        return selective_log_softmax(logits, ids), ent

    def _logits(self, head, hidden: Tensor) -> Tensor:
        """The model's own logits [M, V] in float32: its head, then its scale and soft-cap."""
        logits = head(hidden).float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logit_softcap:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits


def logit_transform(config) -> tuple[float, float | None]:
    """``(scale, softcap)`` of what a causal LM's own forward does to its head's output ``z``:
    ``logits = softcap * tanh(scale * z / softcap)`` (no cap: ``scale * z``). Read from the config:
    Cohere's ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides, Gemma-2/3's
    ``final_logit_softcapping`` caps (None or 0: no cap)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(text, "logit_scale", None) or 1.0) / float(getattr(text, "logits_scaling", None) or 1.0)
    cap = getattr(text, "final_logit_softcapping", None)
    return scale, float(cap) if cap else None

def _eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    return sorted(i for i in ids if i is not None)


def length_buckets(mask: Tensor, min_saving: float = 0.2) -> list[tuple[Tensor, int]]:
    """Split rows into at most two buckets by completion length, as ``(rows, width)``, when
    that saves at least ``min_saving`` of the padded positions; else one bucket."""
    lengths = mask.sum(1).long().clamp(min=1).cpu()
    order = torch.argsort(lengths)
    sorted_len = lengths[order]
    n, longest = len(lengths), int(sorted_len[-1])
    costs = [(s * int(sorted_len[s - 1]) + (n - s) * longest, s) for s in range(1, n)]
    best, split = min(costs, default=(n * longest, n))
    if best > (1 - min_saving) * n * longest:
        return [(torch.arange(n, device=mask.device), longest)]
    order = order.to(mask.device)
    return [(order[:split], int(sorted_len[split - 1])), (order[split:], longest)]


def positions(mask: Tensor) -> Tensor:
    """Position ids under left padding: real tokens count from 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def completion_mask(completion: Tensor, eos_ids: list[int]) -> tuple[Tensor, Tensor]:
    """1 on tokens up to and including the first EOS, 0 after it. Returns (mask, truncated)."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier
    return (~seen_before).float(), ~is_eos.any(-1)

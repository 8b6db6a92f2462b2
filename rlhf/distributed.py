"""Several processes through accelerate: who writes, how numbers are combined across ranks.

    accelerate launch --num_processes 2 -m rlhf.cli train recipes/grpo_arith.yaml

One process is the common case and costs nothing: every reduction below returns its input.
Under ``accelerate launch`` (DDP on CPUs with gloo, on GPUs with NCCL) each rank samples its
share of the step's prompts (whole groups), and the numbers that depend on the whole batch
are computed on the whole batch: rewards are gathered before advantages (batch-scaled
rewards, the moving baseline and whitening see every rank's samples), the loss normaliser
counts every rank's tokens, and logged metrics are reduced over ranks. Where every rank
holds the whole model (DDP, ZeRO-1/2) the weights are checked for drift after every step
(``dist/param_max_diff``, 0 when the ranks agree).

Sharded models (FSDP2, DeepSpeed ZeRO-3) train sharded, but sample with their parameters
gathered (``full_params``), as TRL does under ZeRO-3: decoding runs a different number of
forward calls on each rank (rows end at different lengths), which per-layer gathers cannot
survive, and one gather per rollout is cheaper than one per layer per token.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from rlhf.core.logprobs import wide_dtype
from rlhf.errors import UserError

# distributed types the LM trainer runs under (accelerate's DistributedType values)
DATA_PARALLEL = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA")
SUPPORTED = (*DATA_PARALLEL, "FSDP", "DEEPSPEED")
DEEPSPEED_DIR = "deepspeed"  # in a checkpoint: the engine's own files, one optimiser partition per rank


class Dist:
    """A thin layer over ``accelerate.Accelerator`` with the few collectives the trainer needs."""

    def __init__(self, mixed_precision: str | None = None, trackers: dict | None = None):
        """``trackers``: the Accelerator's tracking arguments (``rlhf.tracking.accelerator_kwargs``)."""
        from accelerate import Accelerator

        kwargs = {} if mixed_precision is None else {"mixed_precision": mixed_precision}
        kwargs.update(trackers or {})
        self.acc = Accelerator(cpu=use_cpu(), **kwargs)
        if use_cpu() and self.acc.num_processes > 1:
            _sharding_on_cpus(self.acc)
        kind = str(self.acc.distributed_type).split(".")[-1]
        if kind not in SUPPORTED:
            raise UserError(f"accelerate is configured for {kind}; the LM trainers run under DDP, FSDP2 or "
                            "DeepSpeed ZeRO (examples: recipes/accelerate/*.yaml)")
        if kind == "FSDP" and not self.acc.is_fsdp2:
            raise UserError("this accelerate config asks for FSDP version 1; the LM trainers run under FSDP2: "
                            "set fsdp_version: 2 in its fsdp_config (recipes/accelerate/fsdp2_*.yaml)")
        self.kind = kind
        self.zero_stage = self.acc.state.deepspeed_plugin.zero_stage if kind == "DEEPSPEED" else 0
        # every rank holds every parameter whole (else: shards, gathered to sample and save)
        self.replicated = kind in DATA_PARALLEL or self.zero_stage < 3 and kind == "DEEPSPEED"
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        self.is_main = self.acc.is_main_process
        self.device = self.acc.device

    # ------------------------------------------------------------------ splitting work
    def check_split(self, prompts_per_step: int, minibatches: int) -> None:
        """Every rank's share of a step's prompts splits into ``minibatches`` of whole groups."""
        if (prompts_per_step // self.world) % minibatches or prompts_per_step % self.world:
            raise UserError(f"prompts_per_step={prompts_per_step} must split into {self.world} processes x "
                            f"{minibatches} minibatches of whole groups; make it a multiple of "
                            f"{self.world * minibatches}")

    def check_micro_batches(self, micro_batch_size: int) -> None:
        """Micro-batches accumulate gradients over several backward calls before one step."""
        if micro_batch_size and self.kind == "DEEPSPEED":
            raise UserError(f"micro_batch_size={micro_batch_size} needs gradients accumulated over several "
                            "backward calls, and DeepSpeed's engine steps the optimiser inside each; set "
                            "micro_batch_size: 0 under DeepSpeed, or run under DDP or FSDP2")

    def shard(self, items: list) -> list:
        """This rank's contiguous share of ``items`` (the same list on every rank)."""
        if len(items) % self.world:
            raise UserError(f"prompts_per_step={len(items)} must be a multiple of the number of processes "
                            f"({self.world}) so that every rank samples whole groups")
        k = len(items) // self.world
        return items[self.rank * k:(self.rank + 1) * k]

    # ------------------------------------------------------------------ collectives
    def sum(self, x):
        """Sum over ranks of a tensor or a float (a float comes back as a float)."""
        if self.world == 1:
            return x
        t = torch.as_tensor(x, dtype=wide_dtype(self.device), device=self.device).clone()
        torch.distributed.all_reduce(t)
        return t.to(device=x.device, dtype=x.dtype) if isinstance(x, torch.Tensor) else float(t)

    def mean(self, x):
        return x if self.world == 1 else self.sum(x) / self.world

    def max(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor(float(x), dtype=wide_dtype(self.device), device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks, in rank order, of same-shaped tensors."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x, device=self.device) for _ in range(self.world)]
        torch.distributed.all_gather(parts, x.to(self.device).contiguous())
        return torch.cat(parts).to(x.device)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor gathered with ``gather``."""
        k = x.shape[0] // self.world
        return x[self.rank * k:(self.rank + 1) * k]

    def broadcast(self, obj):
        """The main process's value of a picklable ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def param_max_diff(self, params: list[torch.Tensor]) -> float:
        """max |theta_rank - theta_main| over all ranks and parameters: 0 when DDP kept them in step."""
        if self.world == 1:
            return 0.0
        flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(self.device)
        main = flat.clone()
        torch.distributed.broadcast(main, src=0)
        return self.max(float((flat - main).abs().max()))

    # ------------------------------------------------------------------ checkpoints
    def optimizer_state(self, module: torch.nn.Module, opt) -> dict:
        """What a checkpoint's ``state.pt`` holds for the optimiser: its state dict; under FSDP
        gathered whole on the main process (a collective); under DeepSpeed a pointer to the
        engine's own files, one per rank (``save_shards``)."""
        if self.kind == "FSDP":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(module, opt.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.kind == "DEEPSPEED":
            return {"deepspeed": DEEPSPEED_DIR}
        return opt.state_dict()

    def save_shards(self, directory: Path) -> bool:
        """DeepSpeed: ``directory`` is made anew by the main process, then every rank writes its
        partition of the optimiser state (and the trainable weights) under ``directory/deepspeed``
        with the engine's own checkpointing. Returns whether anything was written (else nothing
        is done: the main process writes the whole optimiser state itself)."""
        if self.kind != "DEEPSPEED":
            return False
        if self.is_main:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
        self.barrier()
        engine = self.acc.deepspeed_engine_wrapped.engine
        engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag="last", exclude_frozen_parameters=True)
        self.barrier()
        return True

    def load_optimizer_state(self, module: torch.nn.Module, opt, state: dict, directory) -> None:
        """Apply a checkpoint's optimiser state (``optimizer_state``'s counterpart)."""
        if self.kind == "FSDP":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(module, opt.optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        elif self.kind == "DEEPSPEED":
            if "deepspeed" not in state:
                raise UserError(f"the checkpoint in {directory} was not written under DeepSpeed; resume it with "
                                "the accelerate config it was trained with")
            engine = self.acc.deepspeed_engine_wrapped.engine
            path, _ = engine.load_checkpoint(str(os.path.join(directory, state["deepspeed"])), tag="last",
                                             load_module_strict=False, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise UserError(f"no DeepSpeed checkpoint under {directory}/{state['deepspeed']}; resume with "
                                "the accelerate config and number of processes the run was trained with")
        elif "deepspeed" in state:
            raise UserError(f"the checkpoint in {directory} was written under DeepSpeed; resume it under the "
                            "same accelerate config")
        else:
            opt.load_state_dict(state)

    def param_share(self, module: torch.nn.Module) -> float:
        """The share of ``module``'s parameter elements this rank holds: 1 replicated, ~1/world sharded."""
        mine = total = 0
        for p in module.parameters():
            n = getattr(p, "ds_numel", p.numel())
            total += n
            mine += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else \
                p.to_local().numel() if hasattr(p, "to_local") else n
        return mine / max(total, 1)

    def step_stats(self, net: torch.nn.Module, trainable: list[torch.Tensor]) -> dict:
        """Metrics of a multi-process step (none in one process): this rank's share of the weights,
        and, where every rank holds them whole, how far the ranks' trainable weights drifted apart."""
        row = {}
        if self.world > 1:
            row["dist/param_share"] = round(self.param_share(net), 4)
        if self.world > 1 and self.replicated:  # DDP keeps the ranks' weights equal; show that it did
            row["dist/param_max_diff"] = self.param_max_diff(trainable)
        return row

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ model
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrap the trainable module (a no-op in one process); gradients are averaged."""
        return self.acc.prepare_model(module) if self.world > 1 else module.to(self.device)

    def prepare(self, module: torch.nn.Module, optimizer, max_grad_norm: float | None):
        """(module, optimizer) ready to train: DDP as ``wrap``; FSDP2 and DeepSpeed through
        ``accelerator.prepare``, which shards the module and re-points the optimizer at the
        shards (DeepSpeed: its engine, which clips gradients at ``max_grad_norm`` itself)."""
        if self.kind in DATA_PARALLEL:
            return self.wrap(module), optimizer
        if self.kind == "DEEPSPEED":
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = 1  # no dataloader: a rollout is one micro-batch
            if ds.get("gradient_clipping", "auto") == "auto":
                ds["gradient_clipping"] = float(max_grad_norm or 0.0)
            ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * self.world * \
                ds.get("gradient_accumulation_steps", 1)
        return self.acc.prepare(module, optimizer)

    def no_sync(self, modules: list[torch.nn.Module]):
        """Inside the block (forward and backward) gradients accumulate on each rank without being
        reduced over ranks (DDP's ``no_sync``, FSDP2's gradient sync off): every micro-batch of
        an optimiser step but the last. A no-op in one process."""
        stack = contextlib.ExitStack()
        if self.world > 1:
            for m in modules:
                stack.enter_context(self.acc.no_sync(m))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (DeepSpeed: its engine's backward, which also steps the optimiser)."""
        self.acc.backward(loss)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """Clip to ``max_norm`` (None: measure only); the total norm before clipping, as a float."""
        norm = self.acc.clip_grad_norm_(params, max_norm or float("inf"))
        norm = getattr(norm, "full_tensor", lambda: norm)()  # FSDP2: a DTensor
        return float("nan") if norm is None else float(norm)

    @contextlib.contextmanager
    def full_params(self, module: torch.nn.Module):
        """Every parameter of ``module`` whole on every rank inside the block, with no collective
        in its forward calls, so each rank can run as many forward calls as it needs (sampling).
        A no-op where the parameters are replicated."""
        if self.replicated:
            yield
            return
        if self.kind == "FSDP":
            from torch.distributed.fsdp import FSDPModule

            units = [m for m in module.modules() if isinstance(m, FSDPModule)]
            # FSDP2 takes the first unit whose forward runs as the root; sampling calls inner
            # units directly, so the root is settled first (what its first forward would do)
            units[0]._get_fsdp_state()._lazy_init()
            for m in units:
                m.unshard()
                m.set_reshard_after_forward(False, recurse=False)
            try:
                yield
            finally:
                for m in units:
                    m.reshard()
                    m.set_reshard_after_forward(self.acc.state.fsdp_plugin.reshard_after_forward, recurse=False)
            return
        import deepspeed

        # ZeRO-3 re-partitions a parameter after each module's forward; with the parameters
        # gathered, its per-module hooks come off for the block and go back on after it
        offload = self.acc.deepspeed_engine_wrapped.engine.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            for p in module.parameters():
                p.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                offload._register_deepspeed_module(offload.module)

    def full_tensors(self, named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{name: the whole tensor, on the CPU} for named parameters or buffers, sharded or not:
        a collective where they are sharded (every rank must call it); for checkpoints."""
        if self.replicated:
            return {n: p.detach().cpu().clone() for n, p in named}
        if self.kind == "FSDP":
            return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone() for n, p in named}
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().cpu().clone() for n, p in named}

    def autocast(self):
        """The mixed-precision context accelerate was configured with (a no-op for "no")."""
        return self.acc.autocast()


class OneProcess:
    """``Dist`` for code called outside a run (tests, evaluation): one process, no collectives."""

    world, rank, is_main, replicated = 1, 0, True, True

    def sum(self, x):
        return x

    mean = max = gather = local = sum

    def no_sync(self, modules):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm(self, params, max_norm):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))

    def autocast(self):
        """No mixed precision outside a run (the trainer's phases call it unconditionally)."""
        return contextlib.nullcontext()


ONE_PROCESS = OneProcess()


def _sharding_on_cpus(acc) -> None:
    """accelerate applies an FSDP or DeepSpeed config only on accelerators: with CPU processes
    its state says MULTI_CPU and the model would be replicated. Switch the state to what the
    launch asked for, so that accelerate's own FSDP2 / DeepSpeed preparation runs on CPU
    processes (gloo) too -- which is how CI tests these paths on machines without GPUs."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state, process = acc.state, PartialState()  # (AcceleratorState re-reads the process state's type)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        from accelerate.utils import FullyShardedDataParallelPlugin

        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        state.distributed_type = process.distributed_type = DistributedType.FSDP
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        try:
            import deepspeed
        except ImportError:
            raise UserError("this accelerate config asks for DeepSpeed, which is not installed: "
                            "pip install deepspeed") from None
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # from the launcher's ACCELERATE_DEEPSPEED_* variables
        plugin.set_mixed_precision(state.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state.distributed_type = process.distributed_type = DistributedType.DEEPSPEED
        deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def use_cpu() -> bool:
    """CPU processes (gloo) when asked (ACCELERATE_USE_CPU) or when there is no accelerator:
    ``accelerate launch --multi_gpu --num_processes 2`` then runs two CPU processes."""
    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return asked or not torch.accelerator.is_available()


def partial_state():
    """accelerate's process state, created the same way ``Dist`` creates it."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def process_device() -> torch.device:
    """The device this process's models run on, picked by accelerate as ``Dist`` picks the
    trainer's: this rank's GPU (or other accelerator) where there is one, else the CPU. For the
    models that run outside the trainer's ``Dist``: evaluation, reward models."""
    return partial_state().device

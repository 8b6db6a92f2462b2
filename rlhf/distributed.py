"""Several processes through accelerate: who writes, how numbers are combined across ranks.

    accelerate launch --num_processes 2 -m rlhf.cli train recipes/grpo_arith.yaml

One process is the common case and costs nothing: every reduction below returns its input.
Under ``accelerate launch`` (DDP on CPUs with gloo, on GPUs with NCCL) each rank samples its
share of the step's prompts (whole groups), and the numbers that depend on the whole batch
are computed on the whole batch: rewards are gathered before advantages (batch-scaled
rewards, the moving baseline and whitening see every rank's samples), the loss normaliser
counts every rank's tokens, and logged metrics are reduced over ranks. The weights are
checked for drift after every step (``dist/param_max_diff``, 0 when the ranks agree).
"""
from __future__ import annotations

import os

import torch

from rlhf.errors import UserError

# distributed types the LM trainer runs under (accelerate's DistributedType values)
SUPPORTED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA")


class Dist:
    """A thin layer over ``accelerate.Accelerator`` with the few collectives the trainer needs."""

    def __init__(self, mixed_precision: str | None = None):
        from accelerate import Accelerator

        kwargs = {} if mixed_precision is None else {"mixed_precision": mixed_precision}
        self.acc = Accelerator(cpu=use_cpu(), **kwargs)
        kind = str(self.acc.distributed_type).split(".")[-1]
        if kind not in SUPPORTED:
            raise UserError(
                f"accelerate is configured for {kind}; the LM trainers run under DDP (one process, "
                "or several on CPUs or GPUs: recipes/accelerate/ddp_*.yaml). LoRA adapters are small "
                "enough that every rank holds the whole model; sharding (FSDP, DeepSpeed) is not "
                "tested here, so it is refused rather than run untested")
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        self.is_main = self.acc.is_main_process
        self.device = self.acc.device

    # ------------------------------------------------------------------ splitting work
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
        t = torch.as_tensor(x, dtype=torch.float64, device=self.device).clone()
        torch.distributed.all_reduce(t)
        return t.to(device=x.device, dtype=x.dtype) if isinstance(x, torch.Tensor) else float(t)

    def mean(self, x):
        return x if self.world == 1 else self.sum(x) / self.world

    def max(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor(float(x), dtype=torch.float64, device=self.device)
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

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ model
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrap the trainable module (a no-op in one process); gradients are averaged."""
        return self.acc.prepare_model(module) if self.world > 1 else module.to(self.device)

    def autocast(self):
        """The mixed-precision context accelerate was configured with (a no-op for "no")."""
        return self.acc.autocast()


def use_cpu() -> bool:
    """CPU processes (gloo) when asked (ACCELERATE_USE_CPU) or when there is no accelerator:
    ``accelerate launch --multi_gpu --num_processes 2`` then runs two CPU processes."""
    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return asked or not torch.accelerator.is_available()


def partial_state():
    """accelerate's process state, created the same way ``Dist`` creates it."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())

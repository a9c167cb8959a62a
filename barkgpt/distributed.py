"""Training on several processes with torchrun: DDP, or FSDP2 (``fully_shard``) for models that do
not fit one device.

``barkgpt train --nproc N`` re-runs itself under ``torch.distributed.run`` (torchrun), which
starts N ranks with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; ``torchrun -m barkgpt train``
works the same. Each rank takes its own slice of every global batch, gradients are averaged
across ranks (DDP all-reduce, or FSDP's reduce-scatter), rank 0 alone writes checkpoints, logs
and plots, and logged losses are averaged across ranks. Backends: gloo on CPU, nccl on CUDA
(PyTorch's DDP and FSDP2 tutorials; nanoGPT's ``train.py`` for the torchrun layout).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from barkgpt.common import BarkError


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (1 when not distributed), ``local_rank``
    on this machine, the ``device`` it trains on (``cuda:<local_rank>`` under nccl), and ``fsdp``:
    parameters are sharded across ranks (only ever True with more than one rank)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1


def setup(device: str, fsdp: bool = False) -> DistContext:
    """Join the process group torchrun set up (a no-op in a plain single process).

    Raises:
        BarkError: ranks on CUDA with fewer GPUs than local ranks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:  # nothing to shard across: --fsdp is a no-op
        return DistContext(device=device)
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise BarkError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); lower --nproc")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistContext(rank, local, world, device, fsdp)


def teardown(ctx: DistContext, wait: bool = True) -> None:
    """Leave the process group. With ``wait`` (a run that ended normally), first a barrier, so no
    rank tears down its communication threads while another (rank 0 writing the last checkpoint)
    still talks to it; after an error, leave at once (a barrier could wait forever)."""
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """The mean of a float over all ranks (the value itself when not distributed)."""
    if not ctx.enabled:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return t.item() / ctx.world_size


def wrap_model(model, ctx: DistContext):
    """The module to train: the model itself (one process), DDP around it, or the model sharded
    in place with FSDP2 (each block, then the root, as PyTorch's FSDP2 tutorial does).

    Mixture-of-Experts models let DDP find unused parameters: an expert may get no tokens in a step.
    """
    if not ctx.enabled:
        return model
    if ctx.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
    return DDP(model, device_ids=ids, find_unused_parameters=bool(model.config.n_expert))


def full_model_state(model, ctx: DistContext) -> dict | None:
    """The full (unsharded) state dict on CPU, for a checkpoint one process can load.

    FSDP gathers the shards (a collective: every rank must call this); rank 0 gets the tensors
    and the other ranks None. Without FSDP, the model's own state dict.
    """
    if not ctx.fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if ctx.is_main else None


def check_nproc(nproc: int, device: str) -> None:
    """Refuse a process count this machine cannot run.

    Raises:
        BarkError: ``nproc`` below 1, above the CPU core count (CPU) or the GPU count (CUDA).
    """
    if nproc < 1:
        raise BarkError(f"--nproc must be at least 1, got {nproc}")
    if device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        if nproc > n:
            raise BarkError(f"--nproc {nproc} needs {nproc} GPUs but this machine has {n}; use --nproc {max(n, 1)}")
    else:
        n = os.cpu_count() or 1
        if nproc > n:
            raise BarkError(f"--nproc {nproc} is more than this machine's {n} CPU cores; use --nproc {n} or fewer")


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``barkgpt <argv>`` on ``nproc`` ranks under torchrun (single machine) and wait.

    Each CPU rank gets ``cores // nproc`` OpenMP threads unless ``OMP_NUM_THREADS`` is set.

    Returns:
        torchrun's exit status.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "barkgpt", *argv]
    return subprocess.run(cmd, env=env).returncode

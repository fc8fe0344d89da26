"""Training under PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer is one shard group,
then the root (embeddings, final norm, head). Nothing home-made: parameters become DTensors sharded on dim 0,
gradients are reduce-scattered (averaged) by FSDP, and the optimizers in `optimizers/` step their local shards
(GaLore and APOLLO gather one gradient matrix at a time for their projection; see optimizers/lowrank.py).

One machine, several processes (CPU over gloo, or one GPU each over nccl):

    torchrun --nproc-per-node 2 my_train.py            # CPU: gloo; GPUs: nccl, one per process

where my_train.py calls `init_distributed()`, builds the model and `shard_model(model)`, builds the optimizer
with `build_optimizer(...)` over `model.parameters()` and trains on `shard_of(batch)`. Pruning masks keep
holding: the optimizers re-zero pruned positions on each rank's rows."""
from __future__ import annotations

import os

import torch
from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.errors import UserInputError


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun (or the caller) set up through the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); gloo on CPU, nccl where CUDA is there. Returns (rank, world size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UserInputError(f"distributed training needs {', '.join(missing)} in the environment: launch with torchrun")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def shard_model(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply `fully_shard` to each decoder layer and then to the whole model, in place; returns the model."""
    from torch.distributed.fsdp import fully_shard

    for layer in ModelAdapter(model).layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def shard_of(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a global batch (contiguous, equal parts): FSDP averages the gradients over ranks, so
    equal parts make the step the same as one process on the whole batch."""
    if batch.shape[0] % world:
        raise UserInputError(f"a batch of {batch.shape[0]} rows does not split evenly over {world} processes")
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]

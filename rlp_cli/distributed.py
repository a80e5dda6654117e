"""One run over several processes (data parallel), set up from torchrun's environment.

`rlp train CONFIG --nproc N` (or `torchrun --nproc-per-node N -m rlp_cli.cli train CONFIG`) starts N
processes. Every rank reads the same global batch of `optim.batch_documents` windows and the same
positions, keeps its contiguous share of the windows, samples and scores thoughts for them, and
backpropagates its share of the loss. Gradients are then summed over the ranks, each weighted by
how many thoughts (or tokens) it holds, so the update is the one a single process would make on the
whole global batch. The optimizer and the EMA teacher then step identically on every rank. Only rank
0 writes the run folder.

gloo on CPU, nccl on GPUs; each rank uses cuda:LOCAL_RANK. Without torchrun's variables this is a
world of one and every function here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from rlp_cli.errors import UserError


COLLECTIVE_TIMEOUT_MIN = 60  # torch's default (10 min on nccl) is shorter than a large checkpoint on shared storage


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=size)


def device_for(spec: str, world: World) -> str:
    """`auto` and `cuda` mean this rank's GPU under torchrun; an explicit cuda:N is kept."""
    if not world.active:
        return spec
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
        return f"cuda:{world.local_rank}"
    return spec


def start(world: World, device: torch.device) -> World:
    """Join the process group (once per process) and return the world with its backend."""
    if not world.active:
        return world
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # rank 0 alone runs the probe and writes checkpoints while the others wait in the next collective
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))
    return World(world.rank, world.local_rank, world.size, backend)


def stop(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def my_share(items: list, world: World) -> list:
    """This rank's contiguous slice of the global batch; the batch must split evenly."""
    if not world.active:
        return items
    if len(items) % world.size:
        raise UserError(f"optim.batch_documents={len(items)} does not split evenly over {world.size} processes. "
                        f"Fix: make it a multiple of {world.size}.")
    n = len(items) // world.size
    return items[world.rank * n:(world.rank + 1) * n]


def _reduce_device(world: World, device: torch.device) -> torch.device:
    return device if world.backend == "nccl" else torch.device("cpu")


def broadcast_parameters(model: torch.nn.Module, world: World) -> None:
    """Every rank starts from rank 0's weights (a random init or a load that differs would split the run)."""
    if not world.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def sum_weighted_gradients(params: list[torch.Tensor], weight: float, world: World) -> float:
    """grad <- sum over ranks of (weight_r * grad_r) / sum of weight_r; returns the total weight.

    Each rank's loss is a mean over its own `weight` thoughts or tokens, so this is the gradient of the
    mean over the whole global batch, even when the ranks hold different numbers of them.
    """
    if not world.active:
        return weight
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    device = _reduce_device(world, flat.device)
    flat = torch.cat([flat.to(device) * weight, torch.tensor([float(weight)], device=device)])
    dist.all_reduce(flat)
    total = float(flat[-1])
    flat = flat[:-1] / max(total, 1e-12)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g).to(g.device, g.dtype))
        offset += g.numel()
    return total


def reduce_metrics(metrics: dict, world: World, device: torch.device, summed: tuple[str, ...]) -> dict:
    """Numbers of one step averaged over the ranks; the keys in `summed` (counts) are added up."""
    if not world.active:
        return metrics
    import torch.distributed as dist

    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_reduce_device(world, device))
    dist.all_reduce(values)
    out = dict(metrics)
    for key, value in zip(keys, values.tolist()):
        out[key] = value if key in summed else value / world.size
    return out


def gather(obj, world: World) -> list:
    """Every rank's `obj`, in rank order, on every rank (small objects: RNG states)."""
    if not world.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out

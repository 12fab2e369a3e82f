"""Data-parallel processes: one ``Communicator`` for the process group of a ``torchrun`` launch (RANK,
WORLD_SIZE, LOCAL_RANK in the environment; one process and no torch.distributed call without them) and for
Ray learner actors (which join a group at an address rank 0 chose), and the gradient sum every rank needs
before its optimizer step."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from policies import full_tensor, placed_like


@dataclass(frozen=True)
class Communicator:
    """This process's place among the data-parallel processes (rank 0 of 1 when alone) and the collectives
    the trainers use; with one process every collective is the identity and torch.distributed is unused."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """In-place sum (or, with op "max", maximum) over ranks (nccl needs the tensor on the device)."""
        if self.world == 1:
            return
        work = tensor.to(self.device) if self.device.type == "cuda" else tensor
        dist.all_reduce(work, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        if work is not tensor:
            tensor.copy_(work.to(tensor.device))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def communicator_from_environment() -> Communicator:
    """Join the process group torchrun describes (nccl on GPUs, one per LOCAL_RANK; gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Communicator(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Communicator(dist.get_rank(), dist.get_world_size(), device)


def join_process_group(init_method: str, rank: int, world: int, device: torch.device) -> Communicator:
    """Join a group of ``world`` processes at ``init_method`` (a tcp:// address rank 0 picked); every rank
    must call this at the same time: it blocks until all have joined (nccl on CUDA devices, else gloo)."""
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank, world_size=world)
    return Communicator(rank, world, device)


def sum_gradients(params: Sequence[torch.nn.Parameter], all_reduce: Callable[[torch.Tensor], None]) -> None:
    """Replace every parameter's gradient by its sum over ranks, in one flat all-reduce. A parameter with
    no gradient on this rank counts as zeros (another rank may have used it)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded (DTensor) state tensor gathered whole: the same
    checkpoint whether the learner was sharded or not. A collective when sharded: every rank calls it."""
    state = optimizer.state_dict()
    return {
        "state": {index: {key: full_tensor(value) for key, value in entry.items()} for index, entry in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a ``gathered_optimizer_state`` (or plain ``state_dict()``): each whole state tensor of a sharded
    parameter is cut to this rank's shard first (no communication). Scalars (AdamW's step) load as they are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    placed = {
        index: {
            key: placed_like(value, params[index]) if isinstance(value, torch.Tensor) and value.shape == params[index].shape else value
            for key, value in entry.items()
        }
        for index, entry in state["state"].items()
    }
    optimizer.load_state_dict({"state": placed, "param_groups": state["param_groups"]})

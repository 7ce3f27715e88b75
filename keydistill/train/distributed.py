"""Data-parallel training under torchrun: the process group, the split of the data, and named collectives.

    torchrun --nproc-per-node 2 -m keydistill.train ...                       # one machine
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m keydistill.train ...

Every rank runs the same stages on its share of each global batch (gloo on CPUs, nccl on GPUs). What keeps
the ranks identical, and away from hangs:
- Each global batch (per-rank batch x ranks) is built from the same length-bucketed order on every rank and
  cut into contiguous chunks, one per rank, so every rank takes part in every step; a rank whose chunk is
  empty runs one example with weight 0 (and no codebook statistics), which keeps the collectives matched.
- Gradients are averaged by DistributedDataParallel; the codebook statistics by the bottleneck's own sync
  (CodebookSync below), since DDP's buffer broadcast would overwrite every rank's EMA with rank 0's: it is
  off (broadcast_buffers=False).
- Every collective is called through `collective`, which names it in the error when it fails or times out
  (--dist-timeout): a stuck or dead rank becomes an error, not a silent hang.
- Rank 0 alone writes files; the others wait at a barrier where they read them.
- After a failed collective the process group is not torn down: gloo's and nccl's teardown of a group with
  a timed-out operation can abort the process or wait on the dead peer, so the job leaves at once with its
  exit status (`shutdown`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from keydistill.train.config import RunError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_setting: str, timeout_s: float) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (or run alone): (ranks, this rank's device)."""
    if not launched_by_torchrun():
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device_setting == "auto" else device_setting
        )
        return SINGLE, device
    ranks = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    # Decided from what every rank of a node sees alike, so that all of them pick the same backend.
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_cuda = device_setting.startswith("cuda") or (device_setting == "auto" and gpus > 0)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if use_cuda and ranks_here > gpus:  # nccl takes one GPU per rank; a missing one is "invalid device ordinal"
        raise RunError(
            f"{ranks_here} ranks on this node but {gpus} CUDA device(s): nccl takes one GPU per rank; "
            f"start at most {gpus} (torchrun --nproc-per-node) or train on the CPUs with --device cpu"
        )
    device = torch.device("cuda", ranks.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        # Without blocking waits nccl's collectives return at once and a stuck rank's timeout makes the
        # watchdog kill the process; with them the collective raises, and `collective` names it.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return ranks, device


_failed_collectives: list[str] = []  # names of this process's collectives that failed (shutdown reads it)


def collective(name: str, call, *args, **kwargs):
    """Run one collective; a failure (a rank that died, or the timeout) names it and this rank."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as e:  # gloo and nccl raise RuntimeError subclasses (DistBackendError) on failure or timeout
        _failed_collectives.append(name)
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise RunError(
            f"rank {rank}: the collective '{name}' failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "another rank died or is stuck (see its log; --dist-timeout sets the wait)"
        ) from e


def barrier(name: str) -> None:
    if dist.is_initialized():
        collective(f"barrier: {name}", dist.barrier)


def all_reduce_sum_(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if dist.is_initialized():
        collective(name, dist.all_reduce, tensor)
    return tensor


def broadcast_(tensor: torch.Tensor, name: str, src: int = 0) -> torch.Tensor:
    if dist.is_initialized():
        collective(name, dist.broadcast, tensor, src)
    return tensor


def all_gather_objects(obj, name: str) -> list:
    """Every rank's obj, in rank order (tensors should be on the CPU)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    collective(name, dist.all_gather_object, gathered, obj)
    return gathered


def quiet_unless_main(ranks: Dist) -> None:
    """Only rank 0 prints (errors still reach stderr on every rank)."""
    if not ranks.main:
        import builtins

        original = builtins.print

        def errors_only(*args, **kwargs):
            if kwargs.get("file") is sys.stderr:
                original(*args, **kwargs)

        builtins.print = errors_only


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broken() -> bool:
    """Whether a collective of this process failed: its process group is unusable (no later task may run)."""
    return bool(_failed_collectives)


def shutdown(status: int) -> int:
    """Leave the process group and return the exit status. After a failed collective the process exits here
    with the status, its output flushed, without tearing the group down (its teardown, also the one at
    interpreter exit, can abort with SIGABRT or hang on the dead peer, hiding the error's exit status)."""
    if dist.is_initialized():
        if broken():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        dist.destroy_process_group()
    return status


# ----------------------------------------------------------------------------------------------------------
# The split of the data
# ----------------------------------------------------------------------------------------------------------


def chunk(batch: list[int], ranks: Dist) -> list[int]:
    """This rank's contiguous part of a global batch (sizes differ by at most one; it may be empty)."""
    n = len(batch)
    return batch[ranks.rank * n // ranks.world : (ranks.rank + 1) * n // ranks.world]


def round_robin(batches: list[list[int]], ranks: Dist) -> list[list[int]]:
    """This rank's share of evaluation batches, whose results are gathered afterwards."""
    return batches[ranks.rank :: ranks.world]


# ----------------------------------------------------------------------------------------------------------
# Codebook statistics, summed across ranks before every EMA step
# ----------------------------------------------------------------------------------------------------------


class CodebookSync:
    """The bottleneck's hook for data parallelism (DiscreteKeyBottleneck.sync).

    reduce(counts, sums): one fused all-reduce of the per-key counts [H, K], sums [H, K, d] and the per-rank
    vector counts, so that every rank applies the same EMA step (that of the concatenated batches).
    restart_rows / gather_rows: dead-key restarts drawn on rank 0 over all ranks' vectors and filled in by
    the rank that holds each one, so the new keys are the same everywhere.
    """

    def __init__(self, ranks: Dist):
        self.ranks = ranks

    def reduce(self, counts: torch.Tensor, sums: torch.Tensor, local_rows: int):
        sizes = counts.new_zeros(self.ranks.world)
        sizes[self.ranks.rank] = local_rows
        flat = all_reduce_sum_(torch.cat([counts.reshape(-1), sums.reshape(-1), sizes]), "codebook statistics")
        c, s = counts.numel(), sums.numel()
        return flat[:c].view_as(counts), flat[c : c + s].view_as(sums), flat[c + s :].long()

    def restart_samples(
        self, recent: torch.Tensor, rows_per_rank: torch.Tensor, shape: tuple[int, int]
    ) -> torch.Tensor | None:
        """[H, K, d] vectors for dead-key restarts: uniform draws over every rank's vectors."""
        total = int(rows_per_rank.sum())
        if total == 0:
            return None
        h, k = shape
        rows = torch.randint(total, (h, k), device=recent.device)  # rank 0's draw is the one that counts
        broadcast_(rows, "dead-key restart draws")
        start = int(rows_per_rank[: self.ranks.rank].sum())
        mine = (rows >= start) & (rows < start + recent.shape[0])
        local = (rows - start).clamp(0, max(recent.shape[0] - 1, 0))
        samples = torch.zeros(h, k, recent.shape[-1], dtype=torch.float32, device=recent.device)
        if recent.shape[0]:
            picked = recent[local, torch.arange(h, device=recent.device).unsqueeze(1)].float()
            samples = torch.where(mine.unsqueeze(-1), picked, samples)
        return all_reduce_sum_(samples, "dead-key restart vectors")


def attach_codebook_sync(model: torch.nn.Module, ranks: Dist) -> None:
    """Give every bottleneck in model the cross-rank statistics hook, and dense value gradients, which DDP
    can reduce (nothing to do alone)."""
    from keydistill.bottleneck import DiscreteKeyBottleneck

    for module in model.modules():
        if isinstance(module, DiscreteKeyBottleneck):
            module.sync = CodebookSync(ranks) if ranks.active else None
            module.sparse_gradients = not ranks.active


def row_sparse_value_gradients_(model: torch.nn.Module) -> None:
    """Before the optimizer step under DDP: a value table's gradient arrives dense (attach_codebook_sync);
    where one process would have had a row-sparse one, make it row-sparse again, holding the rows with any
    nonzero entry (the rows some rank's batch selected). LazyAdamW then moves the rows one process moves,
    where a dense gradient would move every row by its momentum and weight decay."""
    from keydistill.bottleneck import DiscreteKeyBottleneck

    for module in model.modules():
        if isinstance(module, DiscreteKeyBottleneck) and module.row_sparse_value_gradient():
            grad = module.values.grad
            if grad is not None and not grad.is_sparse:
                module.values.grad = grad.to_sparse(2)  # coalesced: each (head, key) row once, in order


def broadcast_codebooks(model: torch.nn.Module) -> None:
    """Make every rank's codebook state rank 0's (after k-means, which each rank ran on the same data)."""
    from keydistill.bottleneck import CODEBOOK_STATE, DiscreteKeyBottleneck

    if not dist.is_initialized():
        return
    for module in model.modules():
        if isinstance(module, DiscreteKeyBottleneck):
            for name in CODEBOOK_STATE:
                broadcast_(getattr(module, name), f"codebook {name} from rank 0")

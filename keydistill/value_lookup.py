"""Reading a bottleneck's value table [H, K, V] with a row-sparse gradient: only the rows a batch selected.

The dense lookup `values[heads, index]` gives the table a dense gradient: an [H, K, V] tensor of zeros with
the selected rows filled in, which the optimizer then walks in full. At the DKVB scale (32 heads x 4096
keys x V=384, 50M entries) that costs more than the rest of a distillation step, although a batch of 1,024
tokens selects at most 32,768 rows. Here the gradient is a sparse COO tensor of the table's shape with two
sparse dimensions (head, key) and the value dimension dense: coalesced (each selected row once, sorted),
so keydistill.optim.LazyAdamW updates exactly those rows.

Both lookups are one mean per bag of lookups, out[b] = mean over the lookups l of bag b of table[row_l], with
the table viewed as [H*K, V]; torch's embedding_bag computes it without materialising the per-lookup rows,
and its transpose (the gradient) is again an embedding_bag, over the lookups sorted by row.
- pooled_values: the bottleneck's whole hard-lookup path, the mean over heads and then over a row's kept
  positions, as one mean per batch row over its positions' H lookups ([B, V]; no kept position gives 0).
- head_values: the per-(position, head) rows [N, H, V] (bags of one lookup), for the straight-through path
  that adds a soft term per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _BagMean(torch.autograd.Function):
    """out [B, V] = per bag b, the mean of table[rows[l]] over the lookups l of bag b (0 for an empty bag).

    table: [H, K, V] (read as [H*K, V]); rows: int64 [L] into H*K; offsets: int64 [B], the first lookup of each
    bag (lookups grouped by bag, bags in order; an empty bag repeats the next offset). The gradient w.r.t.
    table is a sparse COO tensor with sparse dims (head, key), each selected row once, in order."""

    @staticmethod
    def forward(ctx, table, rows, offsets):
        h, k, v = table.shape
        ctx.save_for_backward(rows, offsets)
        ctx.table_shape, ctx.table_dtype = (h, k, v), table.dtype
        return F.embedding_bag(rows, table.reshape(h * k, v), offsets, mode="mean")

    @staticmethod
    def backward(ctx, grad_out):
        rows, offsets = ctx.saved_tensors
        h, k, v = ctx.table_shape
        # Each lookup's share of its bag's gradient, regrouped by table row: the transposed mean.
        sizes = torch.diff(offsets, append=offsets.new_full((1,), rows.numel()))  # a fill, not a host copy
        share = grad_out / sizes.clamp_min(1).unsqueeze(1).to(grad_out.dtype)
        bags = torch.repeat_interleave(
            torch.arange(offsets.numel(), device=rows.device), sizes, output_size=rows.numel()
        )  # output_size: no wait for the sizes' sum
        sorted_rows, order = torch.sort(rows, stable=True)
        unique_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        grad_rows = F.embedding_bag(bags[order], share.contiguous(), starts, mode="sum")
        indices = torch.stack([torch.div(unique_rows, k, rounding_mode="floor"), unique_rows % k])
        grad = torch.sparse_coo_tensor(
            indices, grad_rows.to(ctx.table_dtype), (h, k, v), is_coalesced=True, check_invariants=False
        )
        return grad, None, None


def _flat_rows(index: torch.Tensor, num_keys: int) -> torch.Tensor:
    """index [N, H] -> rows of the [H*K, V] view, position-major: lookup n*H + h is head h of position n."""
    heads = torch.arange(index.shape[1], device=index.device)
    return (index + heads * num_keys).reshape(-1)


def pooled_values(values: torch.Tensor, index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The mean over heads, then over each row's kept positions, of the selected values: [B, V].

    values [H, K, V]; index [N, H], the chosen key per (position, head), positions in positions.nonzero()
    order (row by row); positions [B, T] bool. Equals `_mean_per_row(values[heads, index].mean(1), positions)`
    (every position of a row has H lookups, so the mean of head means is the mean of the row's lookups) up to
    float summation order; the gradient w.r.t. values is row-sparse (see module doc)."""
    per_row = positions.sum(1)  # kept positions per batch row
    offsets = (torch.cumsum(per_row, 0) - per_row) * values.shape[0]
    return _BagMean.apply(values, _flat_rows(index, values.shape[1]), offsets)


def head_values(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[heads, index]: [N, H, V], each (position, head)'s selected row, with a row-sparse gradient."""
    n, num_heads = index.shape
    offsets = torch.arange(n * num_heads, device=index.device)
    return _BagMean.apply(values, _flat_rows(index, values.shape[1]), offsets).view(n, num_heads, -1)

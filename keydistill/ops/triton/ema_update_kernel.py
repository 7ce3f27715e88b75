"""EMA codebook update (VQ-VAE, Laplace-smoothed) as a segmented reduction followed by one elementwise pass.

1. Counts [H, K] and sums [H, K, d] of the rows assigned to each key, into fp32 scratch (no one-hot):
   - fast: grid (N-blocks, H), each row adds itself to its key with tl.atomic_add (int32 counts are exact);
   - deterministic: the (head, key) pairs are stably sorted, and one program per key sums its segment of
     rows in a fixed order, so the result is bit-identical run to run.
2. One pass over (head, key-block) tiles applies the EMA to cluster_size and embed_sum and writes
   keys = embed_sum / smoothed size. The per-head total n_h it needs is known up front:
   sum_k(decay*c + (1-decay)*counts) = decay * sum_k c + (1-decay) * N, since every row picks one key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keydistill.ops.triton._device import device_of

BLOCK_ROWS = 64  # rows of x per program in the reductions
BLOCK_KEYS = 64  # keys per program in the EMA pass


@triton.jit
def _scatter_add_kernel(
    x_ptr,
    index_ptr,
    counts_ptr,
    sums_ptr,
    n_rows,
    n_keys,
    dim,
    stride_xn,
    stride_xh,
    stride_xd,
    stride_in,
    stride_ih,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1).to(tl.int64)  # head * stride may pass 2^31 when x or index is head-major
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    dims = tl.arange(0, BLOCK_D)
    key = tl.load(index_ptr + rows.to(tl.int64) * stride_in + head * stride_ih, mask=row_in, other=0).to(tl.int64)
    slot = head * n_keys + key  # flat (head, key)
    tl.atomic_add(counts_ptr + slot, tl.full((BLOCK_N,), 1, tl.int32), mask=row_in)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + dims
        m = row_in[:, None] & (dd < dim)[None, :]
        xt = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_xn + head * stride_xh + dd[None, :] * stride_xd,
            mask=m,
            other=0.0,
        ).to(tl.float32)
        tl.atomic_add(sums_ptr + slot[:, None] * dim + dd[None, :], xt, mask=m)


@triton.jit
def _segment_sum_kernel(
    x_ptr,
    order_ptr,
    starts_ptr,
    counts_ptr,
    sums_ptr,
    n_heads,
    dim,
    stride_xn,
    stride_xh,
    stride_xd,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    slot = tl.program_id(0)  # flat (head, key); its rows are order[starts[slot]:starts[slot + 1]]
    start = tl.load(starts_ptr + slot)
    end = tl.load(starts_ptr + slot + 1)
    tl.store(counts_ptr + slot, (end - start).to(tl.int32))
    offs = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + dims
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for s0 in range(start, end, BLOCK_N):
            pos = s0 + offs
            p_in = pos < end
            flat = tl.load(order_ptr + pos, mask=p_in, other=0)  # flat = n * H + h
            row = flat // n_heads
            head = flat % n_heads
            m = p_in[:, None] & (dd < dim)[None, :]
            xt = tl.load(
                x_ptr + row[:, None] * stride_xn + head[:, None] * stride_xh + dd[None, :] * stride_xd,
                mask=m,
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(xt, 0)
        tl.store(sums_ptr + slot.to(tl.int64) * dim + dd, acc, mask=dd < dim)


@triton.jit
def _ema_kernel(
    keys_ptr,
    cluster_size_ptr,
    embed_sum_ptr,
    counts_ptr,
    sums_ptr,
    total_ptr,
    n_keys,
    dim,
    decay,
    eps,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = kk < n_keys
    slot = head * n_keys + kk
    size = decay * tl.load(cluster_size_ptr + slot, mask=k_in, other=0.0) + (1.0 - decay) * tl.load(
        counts_ptr + slot, mask=k_in, other=0
    ).to(tl.float32)
    tl.store(cluster_size_ptr + slot, size, mask=k_in)
    total = tl.load(total_ptr + head)
    smoothed = (size + eps) / (total + n_keys * eps) * total
    dims = tl.arange(0, BLOCK_D)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + dims
        m = k_in[:, None] & (dd < dim)[None, :]
        off = slot.to(tl.int64)[:, None] * dim + dd[None, :]
        es = decay * tl.load(embed_sum_ptr + off, mask=m, other=0.0) + (1.0 - decay) * tl.load(
            sums_ptr + off, mask=m, other=0.0
        )
        tl.store(embed_sum_ptr + off, es, mask=m)
        tl.store(keys_ptr + off, es / smoothed[:, None], mask=m)


def _block_d(dim: int) -> int:
    return min(64, triton.next_power_of_2(max(dim, 1)))


def _cluster_stats(x, index, num_keys: int, deterministic: bool):
    """Exact counts (int32 [H, K]) and fp32 sums ([H, K, d]) of the rows assigned to each key."""
    n, h, d = x.shape
    block_d = _block_d(d)
    if not deterministic:
        counts = torch.zeros((h, num_keys), dtype=torch.int32, device=x.device)
        sums = torch.zeros((h, num_keys, d), dtype=torch.float32, device=x.device)
        if n:
            _scatter_add_kernel[(triton.cdiv(n, BLOCK_ROWS), h)](
                x,
                index,
                counts,
                sums,
                n,
                num_keys,
                d,
                x.stride(0),
                x.stride(1),
                x.stride(2),
                index.stride(0),
                index.stride(1),
                BLOCK_N=BLOCK_ROWS,
                BLOCK_D=block_d,
                num_warps=4,
            )
        return counts, sums
    counts = torch.empty((h, num_keys), dtype=torch.int32, device=x.device)
    sums = torch.empty((h, num_keys, d), dtype=torch.float32, device=x.device)
    slots = (index.long() + torch.arange(h, device=x.device) * num_keys).reshape(-1)  # entry n*H+h
    sorted_slots, order = torch.sort(slots, stable=True)  # stable: rows keep their order within a key
    starts = torch.searchsorted(sorted_slots, torch.arange(h * num_keys + 1, device=x.device))
    _segment_sum_kernel[(h * num_keys,)](
        x,
        order,
        starts,
        counts,
        sums,
        h,
        d,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        BLOCK_N=BLOCK_ROWS,
        BLOCK_D=block_d,
        num_warps=2,
    )
    return counts, sums


def ema_update_(keys, cluster_size, embed_sum, x, index, decay: float, eps: float, deterministic: bool) -> None:
    h, k, d = keys.shape
    if h == 0 or k == 0:
        return
    with device_of(keys):
        counts, sums = _cluster_stats(x, index, k, deterministic)
        total = cluster_size.sum(-1) * decay + (1.0 - decay) * x.shape[0]  # n_h after the update, [H]
        _ema_kernel[(triton.cdiv(k, BLOCK_KEYS), h)](
            keys,
            cluster_size,
            embed_sum,
            counts,
            sums,
            total,
            k,
            d,
            decay,
            eps,
            BLOCK_K=BLOCK_KEYS,
            BLOCK_D=_block_d(d),
            num_warps=4,
        )

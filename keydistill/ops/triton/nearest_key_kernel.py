"""Nearest codebook key per (row, head) in one fused pass; no N x K tensor is ever formed.

Grid (N-blocks, H): a program keeps a tile of BLOCK_N queries of one head on chip and streams that head's
keys through in tiles of BLOCK_K. Candidates are ranked by ||k||^2 - 2 x.k (||k||^2 computed once per
call, x.k on tensor cores via tl.dot), with the running min and argmin held in registers (scores within 2 fp32 eps of
|x|^2 + max |k|^2 of the minimum count as ties and go to the lowest k). The winner's
distance is then recomputed directly as sum((x - k)^2) in fp32, so sqdist carries no cancellation error.

Precision of the dot products: 16-bit inputs are exact in tf32 (bf16 and fp16 mantissas fit in tf32's 10
bits), so tiles are widened to fp32 and multiplied with "tf32"; fp32 inputs use "tf32x3", which is
fp32-accurate. (Widening also keeps bf16 out of tl.dot, which the Triton interpreter gets wrong.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keydistill.ops.triton._device import device_of

MIN_DOT_K = 16  # tl.dot needs an inner dimension of at least 16: d is padded (masked) up to it
MAX_BLOCK_D = 32  # wider d is walked in chunks of this many dimensions
# Tiles, from ptxas reports (python -m keydistill.ops.triton.compile_check): one d chunk (d <= 32) takes
# 128 queries x 64 keys (128 registers at 8 warps on sm_90); several chunks take 64 x 128, which halves the
# query tile reloaded per chunk (248 registers for fp32, 182 for 16-bit, no spills on sm_90; on sm_80 fp32
# spills ~100 bytes).
SINGLE_CHUNK_TILE = (128, 64)
MULTI_CHUNK_TILE = (64, 128)


@triton.jit
def _nearest_key_kernel(
    x_ptr,
    keys_ptr,
    key_sq_ptr,
    key_sq_max_ptr,
    index_ptr,
    sqdist_ptr,
    n_rows,
    n_keys,
    dim,
    stride_xn,
    stride_xh,
    stride_xd,
    stride_kh,
    stride_kk,
    stride_kd,
    DOT_PRECISION: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    TIE_EPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    head64 = head.to(tl.int64)  # head * stride may pass 2^31 (H*K*d elements, or a head-major x)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    dims = tl.arange(0, BLOCK_D)
    key_cols = tl.arange(0, BLOCK_K)
    x_base = x_ptr + rows.to(tl.int64)[:, None] * stride_xn + head64 * stride_xh
    k_base = keys_ptr + head64 * stride_kh

    # Scores within `slack` of the minimum count as tied and go to the lowest k. The slack (2 eps of
    # |x|^2 + max |k|^2) is below the scores' own fp32 error bound, so this only makes ties robust to
    # rounding that differs between output columns: identical keys must get identical scores, and matmuls
    # need not guarantee that (the interpreter's BLAS does not).
    x_sq = tl.zeros((BLOCK_N,), tl.float32)
    for c in range(D_CHUNKS):
        dd = c * BLOCK_D + dims
        xt = tl.load(x_base + dd[None, :] * stride_xd, mask=row_in[:, None] & (dd < dim)[None, :], other=0.0).to(
            tl.float32
        )
        x_sq += tl.sum(xt * xt, 1)
    slack = TIE_EPS * (x_sq + tl.load(key_sq_max_ptr + head))

    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, n_keys, BLOCK_K):
        kk = k0 + key_cols
        k_in = kk < n_keys
        dots = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for c in range(D_CHUNKS):  # a loop, not unrolled: unrolled tf32x3 chunks spill registers
            dd = c * BLOCK_D + dims
            d_in = dd < dim
            xt = tl.load(x_base + dd[None, :] * stride_xd, mask=row_in[:, None] & d_in[None, :], other=0.0)
            kt = tl.load(
                k_base + kk.to(tl.int64)[:, None] * stride_kk + dd[None, :] * stride_kd,
                mask=k_in[:, None] & d_in[None, :],
                other=0.0,
            )
            dots = tl.dot(xt.to(tl.float32), tl.trans(kt.to(tl.float32)), dots, input_precision=DOT_PRECISION)
        key_sq = tl.load(key_sq_ptr + head64 * n_keys + kk, mask=k_in, other=float("inf"))
        scores = key_sq[None, :] - 2.0 * dots  # ||x - k||^2 - ||x||^2: same argmin
        tile_best = tl.min(scores, 1)
        tied = scores <= (tile_best + slack)[:, None]
        tile_idx = tl.min(tl.where(tied, kk[None, :], n_keys), 1)  # lowest k among the tied
        better = tile_best < best - slack  # a later tile must win by more than a tie
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)

    # Exact fp32 distance to the winner, from direct differences.
    sqdist = tl.zeros((BLOCK_N,), tl.float32)
    w_base = k_base + best_idx.to(tl.int64)[:, None] * stride_kk
    for c in range(D_CHUNKS):
        dd = c * BLOCK_D + dims
        m = row_in[:, None] & (dd < dim)[None, :]
        xt = tl.load(x_base + dd[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
        kt = tl.load(w_base + dd[None, :] * stride_kd, mask=m, other=0.0).to(tl.float32)
        diff = xt - kt
        sqdist += tl.sum(diff * diff, 1)
    out = rows.to(tl.int64) * tl.num_programs(1) + head  # outputs are [N, H] contiguous
    tl.store(index_ptr + out, best_idx.to(tl.int64), mask=row_in)
    tl.store(sqdist_ptr + out, sqdist, mask=row_in)


def nearest_key(x: torch.Tensor, keys: torch.Tensor):
    """(index int64 [N, H], sqdist float32 [N, H]) for x [N, H, d] and keys [H, K, d]."""
    n, h, d = x.shape
    k = keys.shape[1]
    index = torch.empty((n, h), dtype=torch.int64, device=x.device)
    sqdist = torch.empty((n, h), dtype=torch.float32, device=x.device)
    if n == 0 or h == 0:
        return index, sqdist
    key_sq = keys.float().pow(2).sum(-1).contiguous()  # [H, K], once per call
    key_sq_max = key_sq.amax(-1)  # [H], scales the tie slack
    block_d = max(MIN_DOT_K, min(MAX_BLOCK_D, triton.next_power_of_2(d)))
    d_chunks = triton.cdiv(d, block_d)
    block_n, block_k = SINGLE_CHUNK_TILE if d_chunks <= 1 else MULTI_CHUNK_TILE
    sixteen_bit = x.element_size() == 2 and keys.element_size() == 2
    grid = (triton.cdiv(n, block_n), h)
    with device_of(x):
        _nearest_key_kernel[grid](
            x,
            keys,
            key_sq,
            key_sq_max,
            index,
            sqdist,
            n,
            k,
            d,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            DOT_PRECISION="tf32" if sixteen_bit else "tf32x3",
            D_CHUNKS=d_chunks,
            TIE_EPS=2 * torch.finfo(torch.float32).eps,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            num_warps=8,
            num_stages=2,
        )
    return index, sqdist

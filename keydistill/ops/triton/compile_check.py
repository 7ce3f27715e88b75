"""Compile every Triton kernel for a GPU architecture on a machine without a GPU, and report ptxas resources.

    python -m keydistill.ops.triton.compile_check [--arch 90] [--all]

The interpreter (TRITON_INTERPRET=1) runs the kernels' maths on the CPU but never lowers them to PTX, so
it cannot catch what only the GPU compiler rejects (layouts, dot shapes, pointer types) or spots
register spills. This lowers each kernel with representative launch constants through Triton's own
compiler to a cubin, then reads registers and spill bytes from `ptxas -v`. Needs Triton >= 3.2 (named
signatures) and must run without TRITON_INTERPRET; exits non-zero if any kernel fails to compile.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

KD_TYPES = dict(
    mask_ptr="*u8",
    loss_ptr="*fp32",
    n_rows="i32",
    n_cols="i32",
    stride_s="i32",
    stride_t="i32",
    stride_g="i32",
    inv_temperature="fp32",
    temperature="fp32",
    grad_factor="fp32",
)
NEAREST_TYPES = dict(
    key_sq_ptr="*fp32",
    key_sq_max_ptr="*fp32",
    index_ptr="*i64",
    sqdist_ptr="*fp32",
    n_rows="i32",
    n_keys="i32",
    dim="i32",
    stride_xn="i32",
    stride_xh="i32",
    stride_xd="i32",
    stride_kh="i32",
    stride_kk="i32",
    stride_kd="i32",
)
X_STRIDES = dict(stride_xn="i32", stride_xh="i32", stride_xd="i32")


def cases(every: bool):
    """(name, kernel, argument types, constexprs, num_warps): the launch configurations the launchers use."""
    from keydistill.ops.triton import ema_update_kernel as ema
    from keydistill.ops.triton import kd_loss_kernel as kd
    from keydistill.ops.triton import nearest_key_kernel as nk

    dtypes = ("fp32", "fp16", "bf16") if every else ("fp32", "bf16")
    for dt in dtypes:
        for vocab in (2, 200, 30522):  # packed tiny rows, packed short rows, chunked long rows
            rows, block_v, warps = kd._launch_shape(vocab)
            yield (
                f"kd_loss {dt} rows={rows} block_v={block_v}",
                kd._kd_loss_kernel,
                dict(KD_TYPES, student_ptr=f"*{dt}", teacher_ptr=f"*{dt}", grad_ptr=f"*{dt}"),
                dict(HAS_MASK=True, COMPUTE_GRAD=True, ROWS=rows, BLOCK_V=block_v),
                warps,
            )
        precision = "tf32x3" if dt == "fp32" else "tf32"
        for chunks, block_d in ((1, nk.MIN_DOT_K), (8, nk.MAX_BLOCK_D)):
            block_n, block_k = nk.SINGLE_CHUNK_TILE if chunks == 1 else nk.MULTI_CHUNK_TILE
            yield (
                f"nearest_key {dt} d_chunks={chunks}",
                nk._nearest_key_kernel,
                dict(NEAREST_TYPES, x_ptr=f"*{dt}", keys_ptr=f"*{dt}"),
                dict(
                    DOT_PRECISION=precision,
                    D_CHUNKS=chunks,
                    TIE_EPS=2.4e-7,
                    BLOCK_N=block_n,
                    BLOCK_K=block_k,
                    BLOCK_D=block_d,
                ),
                8,
            )
        yield (
            f"ema scatter_add {dt}",
            ema._scatter_add_kernel,
            dict(
                X_STRIDES,
                x_ptr=f"*{dt}",
                index_ptr="*i64",
                counts_ptr="*i32",
                sums_ptr="*fp32",
                n_rows="i32",
                n_keys="i32",
                dim="i32",
                stride_in="i32",
                stride_ih="i32",
            ),
            dict(BLOCK_N=ema.BLOCK_ROWS, BLOCK_D=16),
            4,
        )
        yield (
            f"ema segment_sum {dt}",
            ema._segment_sum_kernel,
            dict(
                X_STRIDES,
                x_ptr=f"*{dt}",
                order_ptr="*i64",
                starts_ptr="*i64",
                counts_ptr="*i32",
                sums_ptr="*fp32",
                n_heads="i32",
                dim="i32",
            ),
            dict(BLOCK_N=ema.BLOCK_ROWS, BLOCK_D=16),
            2,
        )
    yield (
        "ema apply",
        ema._ema_kernel,
        dict(
            keys_ptr="*fp32",
            cluster_size_ptr="*fp32",
            embed_sum_ptr="*fp32",
            counts_ptr="*i32",
            sums_ptr="*fp32",
            total_ptr="*fp32",
            n_keys="i32",
            dim="i32",
            decay="fp32",
            eps="fp32",
        ),
        dict(BLOCK_K=ema.BLOCK_KEYS, BLOCK_D=16),
        4,
    )


def compile_one(kernel, types, constexprs, arch: int, num_warps: int):
    """(registers, spill store bytes) of the kernel compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": 2},
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        suffix = "a" if arch >= 90 else ""  # Triton targets sm_90a on Hopper
        report = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores", report)
    return registers, int(spills.group(1)) if spills else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer, e.g. 80 or 90")
    parser.add_argument("--all", action="store_true", help="every dtype, not only fp32 and bf16")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    failures = 0
    for name, kernel, types, constexprs, warps in cases(args.all):
        try:
            registers, spills = compile_one(kernel, types, constexprs, args.arch, warps)
            print(f"sm_{args.arch}  {name:<40} registers {registers:>3}  spill stores {spills:>4} B", flush=True)
        except Exception as err:  # report every kernel, then fail
            failures += 1
            print(f"sm_{args.arch}  {name:<40} FAILED: {type(err).__name__}: {err}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

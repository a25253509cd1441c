"""Compile every Triton kernel of the ``triton`` backend for a GPU architecture, without a GPU.

Triton's interpreter (how the tests run the kernels on the CPU) checks what they compute, not
whether they compile: a kernel can pass there and fail to lower for the GPU (DESIGN.md section 5).
This compiles each kernel, in the variants the tuner can pick (K split, listed rows, weights one
block ahead, strided convolution), to a cubin with the ptxas that comes with Triton, and prints
each one's shared memory. Run it before a session on a lent GPU; the tests run it for sm_90.

Usage (TRITON_INTERPRET must be unset):
  python scripts/compile_triton.py --arch 90 --dtype bf16 --dtype fp32
"""

from __future__ import annotations

import argparse
import os
import time

#: Pointer arguments whose type does not follow the data's dtype.
POINTERS = {
    "m_ptr": "*u8", "idx_ptr": "*i32", "count_ptr": "*i32", "p_ptr": "*fp32", "lock_ptr": "*i32",
}  # fmt: skip
#: (kernel, its constexpr arguments, pointer types overridden).
VARIANTS = [
    ("_rows_kernel", dict(HAS_MASK=True, HAS_BIAS=True, BLOCK_K=128, BLOCK_N=32, SPLIT_K=1,
                          AHEAD=True, LISTED=False, FUSED_SUM=False), {}),
    ("_rows_kernel", dict(HAS_MASK=True, HAS_BIAS=True, BLOCK_K=64, BLOCK_N=64, SPLIT_K=2,
                          AHEAD=False, LISTED=True, FUSED_SUM=False), {}),  # partial sums
    ("_rows_kernel", dict(HAS_MASK=True, HAS_BIAS=True, BLOCK_K=16, BLOCK_N=512, SPLIT_K=16,
                          AHEAD=False, LISTED=False, FUSED_SUM=True), {}),  # summed by the last
    ("_shared_kernel", dict(HAS_MASK=True, HAS_BIAS=True, BLOCK_M=16, BLOCK_K=64, BLOCK_N=128,
                            SPLIT_K=1, LISTED=True, FUSED_SUM=False), {}),
    ("_shared_kernel", dict(HAS_MASK=True, HAS_BIAS=True, BLOCK_M=16, BLOCK_K=64, BLOCK_N=256,
                            SPLIT_K=8, LISTED=False, FUSED_SUM=True), {}),
    ("_kept_rows_kernel", dict(HAS_MASK=True, SKIP_ZEROS=True, BLOCK=4096), {}),
    ("_sum_splits_kernel", dict(HAS_BIAS=True, SPLIT_K=4, BLOCK=1024), {}),
    ("_out_masked_kernel", dict(HAS_BIAS=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), {}),
    ("_channel_conv_kernel", dict(PER_SAMPLE=1, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1, KH=3, KW=3,
                                  HAS_BIAS=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), {}),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--dtype", action="append", help="fp32, fp16, bf16 (default: all)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from selact.mgemm import triton_kernels

    target = GPUTarget("cuda", args.arch, 32)
    for dtype in args.dtype or ["fp32", "fp16", "bf16"]:
        for name, constexprs, pointers in VARIANTS:
            kernel = getattr(triton_kernels, name)
            signature = {
                p.name: "constexpr"
                if p.is_constexpr
                else pointers.get(p.name, POINTERS.get(p.name, f"*{dtype}"))
                if p.name.endswith("_ptr")
                else "i32"
                for p in kernel.params
            }
            start = time.perf_counter()
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                target=target,
                options={"num_warps": 4, "num_stages": 3},
            )
            print(
                f"sm_{args.arch} {dtype} {name}: {compiled.metadata.shared} bytes of shared "
                f"memory, {time.perf_counter() - start:.1f} s"
            )


if __name__ == "__main__":
    main()

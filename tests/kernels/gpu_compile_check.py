"""Compile every kernel for NVIDIA GPUs (to cubin) without a GPU: Triton's real front end and
backend, so type errors the interpreter does not catch fail here. Run as a script in a process
without TRITON_INTERPRET (the test launches it); prints one line per kernel compiled."""
from __future__ import annotations

import importlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _compile(kernel, pointers: dict, scalars: dict, constexprs: dict, arch: int, **options):
    fn = kernel.fn  # the autotuner's JITFunction
    signature = {name: "i32" for name in fn.arg_names}
    signature.update(pointers)
    signature.update(scalars)
    signature.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    assert "cubin" in compiled.asm, f"{fn.__name__}: no cubin"
    print(f"ok {fn.__name__} sm_{arch} {constexprs} shared={compiled.metadata.shared}", flush=True)


def main() -> None:
    attention = importlib.import_module("runtime.kernels.attention")
    group_norm = importlib.import_module("runtime.kernels.group_norm")
    geglu = importlib.import_module("runtime.kernels.geglu")
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    ptrs = {p: "*bf16" for p in ("Q", "K", "V", "Mask", "Out")}
    _compile(attention._attention_fwd_kernel, ptrs, {"qk_scale": "fp32"},
             {"HAS_MASK": True, "IEEE_DOT": False, "EMULATE_BF16": False, "BLOCK_D": 64,
              "BLOCK_M": 128, "BLOCK_N": 64}, arch, num_warps=4, num_stages=3)
    ptrs = {p: "*fp32" for p in ("Q", "K", "V", "Mask", "Out")}  # head_dim 160 -> BLOCK_D 256, IEEE fp32
    _compile(attention._attention_fwd_kernel, ptrs, {"qk_scale": "fp32"},
             {"HAS_MASK": False, "IEEE_DOT": True, "EMULATE_BF16": False, "BLOCK_D": 256,
              "BLOCK_M": 64, "BLOCK_N": 32}, arch, num_warps=4, num_stages=2)
    _compile(group_norm._group_norm_stats_kernel, {"X": "*fp16", "Partial": "*fp32"}, {},
             {"BLOCK_C": 16, "BLOCK_S": 256}, arch, num_warps=4)
    _compile(group_norm._group_norm_apply_kernel,
             {"X": "*fp16", "Y": "*fp16", "W": "*fp32", "B": "*fp32", "Partial": "*fp32"}, {"eps": "fp32"},
             {"HAS_WEIGHT": True, "HAS_BIAS": True, "SILU": True, "EMULATE_BF16": False, "SPLIT_P2": 8, "BLOCK_C": 16,
              "BLOCK_S": 256}, arch, num_warps=4)
    _compile(geglu._geglu_kernel, {"Proj": "*bf16", "Out": "*bf16"}, {},
             {"EMULATE_BF16": False, "BLOCK_M": 8, "BLOCK_D": 256}, arch, num_warps=4)


if __name__ == "__main__":
    main()

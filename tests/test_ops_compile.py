"""The kernels compile for a real GPU target (sm_90), without a GPU.

Triton's interpreter runs kernel bodies as NumPy and forgives what the compiler does not
(plain-Python globals, type mismatches between branches, unsupported layouts). Compiling ahead
of time to PTX + cubin with the ptxas Triton ships catches those here. Nothing is executed.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles JIT kernels; TRITON_INTERPRET=1 makes them interpreted",
                allow_module_level=True)
_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
if not _PTXAS.exists() and not shutil.which("ptxas"):
    pytest.skip("this triton build ships no ptxas", allow_module_level=True)

COMMON = dict(KBYTES=32, VBYTES=32, KIB=13, VIB=13)
# csr-2b at head_dim 128: 12 atoms of fp8, or 14 of log5 (read through a ladder table).
FORMATS = {0: dict(S=12, CB=8), 5: dict(S=14, CB=5)}


def _compile(kernel, pointers: dict[str, str], constexprs: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    missing = set(constexprs) | set(pointers)
    assert missing <= set(names), missing - set(names)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


@pytest.mark.parametrize("omp, pre_rope, coef", [(True, True, 0), (False, False, 1),
                                                (True, True, 5), (False, False, 5)])
def test_encode_kernel_compiles_for_sm90(omp, pre_rope, coef):
    from csr_vllm.ops.encode import _encode_kernel

    s, cb = FORMATS.get(coef, dict(S=12, CB=16)).values()
    _compile(_encode_kernel,
             {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "atoms_ptr": "*fp32",
              "ladder_ptr": "*fp32", "slot_ptr": "*i64", "cache_ptr": "*u8",
              "work_ptr": "*fp32"},
             dict(D=128, DC=128, C=1, S=s, S_P2=16, M=16, BLOCK_A=64, NB_P2=32, NB=32, CB=cb,
                  IB=13, COEF_FMT=coef, OMP=omp, PRE_ROPE=pre_rope))


@pytest.mark.parametrize("fmt", [0, 5])
@pytest.mark.parametrize("pre_rope", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_sparse_decode_kernel_compiles_for_sm90(pre_rope, accumulate, fmt):
    from csr_vllm.ops.sparse_decode import _sparse_decode_kernel

    s, cb = FORMATS[fmt].values()
    _compile(_sparse_decode_kernel,
             {"q_ptr": "*fp32", "table_ptr": "*fp32", "katoms_ptr": "*fp32",
              "klad_ptr": "*fp32", "vlad_ptr": "*fp32", "rcos_ptr": "*fp32", "rsin_ptr": "*fp32", "cache_ptr": "*u8", "bt_ptr": "*i32",
              "coded_ptr": "*i32", "ntail_ptr": "*i32", "tk_ptr": "*bf16", "tv_ptr": "*bf16",
              "max_ptr": "*fp32", "sum_ptr": "*fp32", "bins_ptr": "*fp32", "accx_ptr": "*fp32"},
             dict(NSP_P2=64, BS=16, G=4, G_P2=4, D=128, CK=1, SK=s, DCK=128,
                  CV=1, SV=s, KFMT=fmt, VFMT=fmt, PRE_ROPE=pre_rope, ACCUMULATE=accumulate,
                  TAIL_BLOCK=16, KCB=cb, VCB=cb, **COMMON))


@pytest.mark.parametrize("pre_rope, kfmt, vfmt", [(False, 0, 1), (True, 0, 1), (True, 5, 5)])
def test_decode_pages_kernel_compiles_for_sm90(pre_rope, kfmt, vfmt):
    from csr_vllm.ops.reconstruct import _decode_pages_kernel

    (sk, kcb), (sv, vcb) = FORMATS[kfmt].values(), (FORMATS[vfmt].values() if vfmt in FORMATS
                                                    else (8, 16))
    _compile(_decode_pages_kernel,
             {"cache_ptr": "*u8", "blocks_ptr": "*i32", "pos0_ptr": "*i64",
              "katoms_ptr": "*fp32", "vatoms_ptr": "*fp32", "klad_ptr": "*fp32",
              "vlad_ptr": "*fp32", "rcos_ptr": "*fp32", "rsin_ptr": "*fp32", "k_out": "*bf16",
              "v_out": "*bf16"},
             dict(BS=16, D=128, CK=1, SK=sk, CV=1, SV=sv, KFMT=kfmt, VFMT=vfmt,
                  PRE_ROPE=pre_rope, KCB=kcb, VCB=vcb, **COMMON))

"""C++ kernels for a CPU (csrc/cpu_kernels.cpp): built once per machine with its own instruction set and loaded as
torch ops, which eager code and compiled graphs call alike:

    llamaref_cpu::int8_linear, llamaref_cpu::int4_linear   the quantized layers' products for a few rows of float32
                                                           x (a decode or verify step; a prefill dequantizes and
                                                           runs one dense matmul instead), quant.py
    llamaref_cpu::decode_layer                             a quantized model's whole block for a decode step
                                                           (norms, products, RoPE, cache write, attention),
                                                           quant.fuse_cpu_decode
    llamaref_cpu::packed_linear                            oneDNN's matmul over a prepacked weight, for the
                                                           verify step of a float32 or bf16 model, speculative.py

Why our own: torch's CPU weight-only ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) take 7-11x as
long as float32 `F.linear` at one row on the machine of docs/benchmarks.md, and Inductor's C++ backend fuses int8
into one loop but does not vectorise int4 unpacking; oneDNN's matmul reached from a Python custom op cost ~23 us a
call in Python. The build is a plain compiler call against torch's headers (~10 s, once: the library is cached
under ~/.cache/llamaref/kernels by a hash of the source, the flags and the torch version; $CXX and $CXXFLAGS
apply, e.g. CXXFLAGS=-mno-avx512f for the AVX2 loops on an AVX-512 machine). Where it cannot be built (no C++
compiler, a CPU without AVX2, not x86), `ops()` says why once and returns None, and the callers keep their
PyTorch paths.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
MAX_ROWS = 17  # rows of x the kernels take; more (a prefill) are faster dequantized and multiplied by one matmul


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "llamaref" / "kernels"


def _command(output: Path) -> list[str]:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", "-march=native", *os.environ.get("CXXFLAGS", "").split(), "-std=c++17", "-shared",
            "-fPIC", "-fopenmp",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *[f"-I{p}" for p in cpp_extension.include_paths()], str(SOURCE),
            "-o", str(output), *[f"-L{p}" for p in cpp_extension.library_paths()], "-lc10", "-ltorch_cpu"]


def _build() -> Path:
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(_command(Path("out"))).encode())
    key.update(torch.__version__.encode())
    library = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    print("building the CPU kernels for this machine (once, ~10 s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        result = subprocess.run(_command(built), capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise RuntimeError(lines[0] if lines else f"the compiler exited with {result.returncode}")
        os.replace(built, library)  # (atomic: processes building at once each leave a whole library)
    return library


@functools.cache
def ops():
    """torch.ops.llamaref_cpu once it is built and loaded; None (after one warning) where it cannot be."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        reason = f"no kernels for {platform.machine()}"
    else:
        try:
            torch.ops.load_library(str(_build()))
        except (OSError, RuntimeError) as e:
            reason = str(e)
        else:
            _register_fakes()
            return torch.ops.llamaref_cpu
    warnings.warn(f"the CPU kernels are not available ({reason}); quantized layers and speculative verify steps "
                  "use PyTorch's slower paths", stacklevel=2)
    return None


def _register_fakes() -> None:
    """Shapes for torch.compile, which traces the ops without running them."""

    @torch.library.register_fake("llamaref_cpu::int8_linear")
    def _(x, q, scale):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("llamaref_cpu::int4_linear")
    def _(x, qweight, scales, mins, group_size):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("llamaref_cpu::decode_layer")
    def _(x, attention_norm, mlp_norm, eps, qkv, o, gate_up, down, biases, cos, sin, positions, cache_k, cache_v,
          n_heads):
        return torch.empty_like(x)

    @torch.library.register_fake("llamaref_cpu::packed_linear")
    def _(x, packed, bias, out_features):
        return x.new_empty(*x.shape[:-1], out_features)


"""Block-scaled dense FP8 GEMM on cuBLASLt: DeepSeek-V3's recipe (one fp32 scale per 1 x 128 of the activations,
one per 128 x 128 weight block) as cuBLAS runs it on Hopper from version 12.9 (`CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F`
for the activations, `BLK128x128_32F` for the weight), called inside the program through `buffer_callback` on XLA's
stream: no host synchronization, the same stream order as the surrounding kernels.

It is the library's answer to what `dense_fp8` does on this project's Mosaic GPU kernel, timed beside it by
`experiments.bench_fp8_dense` (case `cublaslt`); `dense_fp8` takes it at the shapes where that benchmark's rounds
(`--record` or `--tune`) recorded it faster (`KERNEL`'s entries in the block cache). cuBLAS 13.1.0 on H100, 32768
rows, over per-tensor cuBLAS FP8 in the same rounds: 0.908 at q_a+kv_a, 0.982 at o, 0.918 at the MLP's down,
against the Mosaic GPU kernel's 0.816, 0.932, 0.799.

cuBLAS is column-major. The weight, [N, K] row-major as the checkpoint stores it, is cuBLAS's A: a K x N column-major
matrix, transposed (cuBLASLt's FP8 kernels take only this "TN" form on Hopper). The activations, [T, K] row-major,
are B: K x T column-major, not transposed. The output, [T, N] row-major, is D: N x T column-major. The scales follow
cuBLAS's layouts for those operands (cuBLAS documentation, "Scaling factor layouts"): A's 128 x 128 block scales
K-block-major, [N/128, K/128] row-major with the K blocks padded to a multiple of 4, which is the checkpoint's own
layout; B's 1 x 128 scales with the tokens contiguous, [K/128, T] row-major, which is `fp8.quantize_rows`' layout.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import glob
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from dwdp_jax.kernels import fp8

KERNEL = "dense_cublaslt_fp8"  # its rates in the block cache (`tuning`), beside dense_fp8.NAME_TUNED's
MIN_VERSION = 120900  # cublasLtGetVersion() of cuBLAS 12.9, the first with block scales on Hopper
WORKSPACE_BYTES = 32 << 20
# Rows: cuBLAS 13.1 has no block-scaled algorithm at T = 4173 or 4174 (status 15; 4168, 4172, 4176 run, H100).
# Outputs: the bf16 output's rows 16-byte aligned.
T_MULTIPLE, N_MULTIPLE = 4, 8
_WORKSPACE_ALIGN = 256  # cublasLtMatmul's workspace alignment

# cublasLt.h (cuBLAS 13.1) and library_types.h
_CUDA_R_32F, _CUDA_R_16BF, _CUDA_R_8F_E4M3 = 0, 14, 28
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_DESC_A_SCALE_POINTER, _DESC_B_SCALE_POINTER = 17, 18
_DESC_A_SCALE_MODE, _DESC_B_SCALE_MODE = 31, 32
_SCALE_VEC128_32F, _SCALE_BLK128x128_32F = 4, 5
_PREF_MAX_WORKSPACE_BYTES = 1


@dataclasses.dataclass(frozen=True)
class Blocks:
    """cuBLASLt picks its own tiles (its heuristic's first algorithm): a cache entry carries only the rate."""


class _HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t."""

    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _library_path() -> str | None:
    """The libcublasLt XLA already loaded (so one copy serves both), else the pip wheels' copy."""
    try:
        with open("/proc/self/maps") as maps:
            loaded = sorted({line.split()[-1] for line in maps if "libcublasLt.so" in line})
        if loaded:
            return loaded[0]
    except OSError:
        pass
    import site

    wheels = [p for root in site.getsitepackages()
              for p in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcublasLt.so*")))]
    return wheels[0] if wheels else None


class _Lt:
    """The handful of cuBLASLt entry points the GEMM needs, each call's status checked."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        vp, i32, sz, pvp = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)
        lib.cublasLtGetVersion.restype, lib.cublasLtGetVersion.argtypes = sz, []
        signatures = {
            "cublasLtCreate": [pvp],
            "cublasLtMatmulDescCreate": [pvp, i32, i32],
            "cublasLtMatmulDescSetAttribute": [vp, i32, vp, sz],
            "cublasLtMatrixLayoutCreate": [pvp, i32, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
            "cublasLtMatmulPreferenceCreate": [pvp],
            "cublasLtMatmulPreferenceSetAttribute": [vp, i32, vp, sz],
            "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, i32, ctypes.POINTER(_HeuristicResult),
                                               ctypes.POINTER(i32)],
            "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.POINTER(ctypes.c_uint64 * 8),
                               vp, sz, vp],
        }
        for name, args in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = i32, args
        self.lib, self.path, self.version = lib, path, int(lib.cublasLtGetVersion())

    def check(self, call: str, status: int) -> None:
        if status:
            raise RuntimeError(f"cuBLASLt: {call} returned status {status}")

    def create(self, fn: str, *args) -> int:
        obj = ctypes.c_void_p()
        self.check(fn, getattr(self.lib, fn)(ctypes.byref(obj), *args))
        return obj.value

    def set(self, fn: str, obj: int, attr: int, value) -> None:
        self.check(f"{fn}({attr})", getattr(self.lib, fn)(obj, attr, ctypes.addressof(value), ctypes.sizeof(value)))


@functools.cache
def _lt() -> _Lt | str:
    """The loaded library, or why there is none."""
    path = _library_path()
    if path is None:
        return "libcublasLt not found (jax's CUDA plugin loads it on a GPU machine)"
    try:
        lt = _Lt(path)
    except (OSError, AttributeError, RuntimeError) as e:
        return f"libcublasLt at {path} unusable: {e}"
    if lt.version < MIN_VERSION:
        return f"cuBLASLt {lt.version} at {path} predates block-scaled FP8 on Hopper (needs >= {MIN_VERSION})"
    return lt


def unavailable(device: jax.Device | None = None) -> str | None:
    """Why this GEMM cannot run on `device` (default: the first), or None where it can: a Hopper GPU (compute
    capability 9.0: block scales are Hopper-only in cuBLAS) with cuBLAS 12.9 or later."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return f"needs a Hopper GPU, got a {device.platform} device"
    capability = getattr(device, "compute_capability", None)
    if capability != "9.0":
        return f"block-scaled FP8 on cuBLASLt needs compute capability 9.0 (Hopper), got {capability}"
    lt = _lt()
    return lt if isinstance(lt, str) else None


def padded_weight_scales(scales_RS: jax.Array) -> jax.Array:
    """The weight's [N/128, K/128] block scales with the K blocks padded to a multiple of 4 (cuBLAS's BLK128x128
    layout); zeros in the padding, which no product reads."""
    pad = -scales_RS.shape[1] % 4
    return jnp.pad(scales_RS, ((0, 0), (0, pad))) if pad else scales_RS


def aligned(t: int, n: int) -> bool:
    """Whether cuBLAS 13.1 has a block-scaled algorithm for T rows and N outputs (`T_MULTIPLE`, `N_MULTIPLE`)."""
    return t > 0 and n > 0 and t % T_MULTIPLE == 0 and n % N_MULTIPLE == 0


def check_operands(x_TK: jax.Array, x_scale_ST: jax.Array, w: fp8.BlockScaled) -> tuple[int, int, int]:
    """(T, K, N), or ValueError naming the operand: e4m3 rows [T, K] with fp32 scales [K/128, T]; an e4m3 weight
    [N, K] with fp32 scales [N/128, K/128]; T a multiple of `T_MULTIPLE`, K of 128 (the activations' scale
    groups), N of `N_MULTIPLE`."""
    if x_TK.ndim != 2 or x_TK.dtype != fp8.E4M3:
        raise ValueError(f"cublaslt_fp8: x must be e4m3 [T, K], got {x_TK.dtype} {x_TK.shape}")
    t, k = x_TK.shape
    if t % T_MULTIPLE or t == 0:
        raise ValueError(f"cublaslt_fp8: T must be a positive multiple of {T_MULTIPLE}, got {t}")
    if k % fp8.BLOCK or k == 0:
        raise ValueError(f"cublaslt_fp8: K must be a positive multiple of {fp8.BLOCK}, got {k}")
    if x_scale_ST.dtype != jnp.float32 or x_scale_ST.shape != (k // fp8.BLOCK, t):
        raise ValueError(f"cublaslt_fp8: x_scale must be float32 [K/128, T] = {(k // fp8.BLOCK, t)}, got "
                         f"{x_scale_ST.dtype} {x_scale_ST.shape}")
    values, scales = w
    if values.ndim != 2 or values.dtype != fp8.E4M3 or values.shape[1] != k:
        raise ValueError(f"cublaslt_fp8: the weight must be e4m3 [N, K={k}], got {values.dtype} {values.shape}")
    n = values.shape[0]
    if n % N_MULTIPLE or n == 0:
        raise ValueError(f"cublaslt_fp8: N must be a positive multiple of {N_MULTIPLE}, got {n}")
    if scales.dtype != jnp.float32 or scales.shape != (fp8.blocks(n), k // fp8.BLOCK):
        raise ValueError(f"cublaslt_fp8: the weight's scales must be float32 [N/128, K/128] = "
                         f"{(fp8.blocks(n), k // fp8.BLOCK)}, got {scales.dtype} {scales.shape}")
    return t, k, n


class _Plan:
    """One device's and shape's handle, matmul descriptor, layouts and algorithm (the heuristic's first), built on
    first use, with that call's scale pointers set before the heuristic (cuBLAS 13.1 refuses block scale modes
    without them: status 7)."""

    def __init__(self, lt: _Lt, handle: int, t: int, k: int, n: int, w_scale: int, x_scale: int):
        self.lt, self.handle = lt, handle
        self.desc = lt.create("cublasLtMatmulDescCreate", _CUBLAS_COMPUTE_32F, _CUDA_R_32F)
        for attr, value in ((_DESC_TRANSA, _CUBLAS_OP_T), (_DESC_TRANSB, _CUBLAS_OP_N),
                            (_DESC_A_SCALE_MODE, _SCALE_BLK128x128_32F), (_DESC_B_SCALE_MODE, _SCALE_VEC128_32F)):
            lt.set("cublasLtMatmulDescSetAttribute", self.desc, attr, ctypes.c_int32(value))
        self.set_scales(w_scale, x_scale)
        self.a = lt.create("cublasLtMatrixLayoutCreate", _CUDA_R_8F_E4M3, k, n, k)
        self.b = lt.create("cublasLtMatrixLayoutCreate", _CUDA_R_8F_E4M3, k, t, k)
        self.d = lt.create("cublasLtMatrixLayoutCreate", _CUDA_R_16BF, n, t, n)
        pref = lt.create("cublasLtMatmulPreferenceCreate")
        lt.set("cublasLtMatmulPreferenceSetAttribute", pref, _PREF_MAX_WORKSPACE_BYTES,
               ctypes.c_uint64(WORKSPACE_BYTES))
        result, count = _HeuristicResult(), ctypes.c_int(0)
        lt.check("cublasLtMatmulAlgoGetHeuristic", lt.lib.cublasLtMatmulAlgoGetHeuristic(
            handle, self.desc, self.a, self.b, self.d, self.d, pref, 1, ctypes.byref(result), ctypes.byref(count)))
        if count.value < 1:
            raise RuntimeError(f"cuBLASLt {lt.version} has no block-scaled FP8 algorithm for T={t}, K={k}, N={n}")
        self.algo = (ctypes.c_uint64 * 8).from_buffer_copy(result.algo)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.lock = threading.Lock()  # the scale pointers live on the descriptor, set per call

    def set_scales(self, w_scale: int, x_scale: int) -> None:
        self.lt.set("cublasLtMatmulDescSetAttribute", self.desc, _DESC_A_SCALE_POINTER, ctypes.c_void_p(w_scale))
        self.lt.set("cublasLtMatmulDescSetAttribute", self.desc, _DESC_B_SCALE_POINTER, ctypes.c_void_p(x_scale))

    def launch(self, stream: int, out: int, x: int, x_scale: int, w: int, w_scale: int, workspace: int) -> None:
        lt = self.lt
        with self.lock:
            self.set_scales(w_scale, x_scale)
            lt.check("cublasLtMatmul", lt.lib.cublasLtMatmul(
                self.handle, self.desc, ctypes.byref(self.alpha), w, self.a, x, self.b, ctypes.byref(self.beta), out,
                self.d, out, self.d, ctypes.byref(self.algo), workspace, WORKSPACE_BYTES, stream))


class Plans:
    """The plans of one process: a cuBLASLt handle per CUDA device (a handle belongs to the device current at its
    creation, and one process runs a program per GPU) and a plan per device and shape, each built in its first
    call on that device (`create_handle()`, `make_plan(handle, t, k, n, w_scale, x_scale)`)."""

    def __init__(self, create_handle, make_plan, current_device):
        self.create_handle, self.make_plan, self.current_device = create_handle, make_plan, current_device
        self.handles: dict[int, int] = {}
        self.plans: dict[tuple[int, int, int, int], _Plan] = {}
        self.lock = threading.Lock()

    def get(self, t: int, k: int, n: int, w_scale: int, x_scale: int) -> _Plan:
        device = self.current_device()
        with self.lock:
            if device not in self.handles:
                self.handles[device] = self.create_handle()
            if (device, t, k, n) not in self.plans:
                self.plans[device, t, k, n] = self.make_plan(self.handles[device], t, k, n, w_scale, x_scale)
            return self.plans[device, t, k, n]


def _current_device() -> int:
    """The CUDA device of the calling thread's current context: XLA makes the executing device's context current
    around its custom calls."""
    cuda = _driver()
    device = ctypes.c_int(-1)
    status = cuda.cuCtxGetDevice(ctypes.byref(device))
    if status:
        raise RuntimeError(f"cuBLASLt: cuCtxGetDevice returned status {status} (no current CUDA context)")
    return device.value


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def _plans() -> Plans:
    lt = _lt()
    return Plans(functools.partial(lt.create, "cublasLtCreate"), functools.partial(_Plan, lt), _current_device)


def _address(buffer) -> int:
    return buffer.__cuda_array_interface__["data"][0]


def _callback(t: int, k: int, n: int):
    def run(ctx, outs, x, x_scale, w, w_scale):
        out, workspace = outs
        base = _address(workspace)
        w_scale_ptr, x_scale_ptr = _address(w_scale), _address(x_scale)
        plan = _plans().get(t, k, n, w_scale_ptr, x_scale_ptr)
        plan.launch(ctx.stream, _address(out), _address(x), x_scale_ptr, _address(w), w_scale_ptr,
                    base + (-base) % _WORKSPACE_ALIGN)

    return run


def block_scaled_gemm(x_TK: jax.Array, x_scale_ST: jax.Array, w: fp8.BlockScaled) -> jax.Array:
    """bf16 [T, N] = (x * its 1 x 128 scales) @ (w * its 128 x 128 block scales).T on cuBLASLt. Operands as
    `check_operands` takes them; ValueError before any device work where `unavailable` names a reason."""
    t, k, n = check_operands(x_TK, x_scale_ST, w)
    reason = unavailable()
    if reason:
        raise ValueError(f"cublaslt_fp8: {reason}")
    run = buffer_callback(_callback(t, k, n), (jax.ShapeDtypeStruct((t, n), jnp.bfloat16),
                                               jax.ShapeDtypeStruct((WORKSPACE_BYTES + _WORKSPACE_ALIGN,), np.uint8)))
    # e4m3 passed as its bytes: the callback's buffers expose no address for F8E4M3FN (UNIMPLEMENTED)
    as_bytes = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint8)
    out, _ = run(as_bytes(x_TK), x_scale_ST, as_bytes(w.values_GNK), padded_weight_scales(w.scales_GRS))
    return out

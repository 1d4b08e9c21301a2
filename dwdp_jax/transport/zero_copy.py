"""JAX arrays over memory the project allocated (a CUDA VMM mapping, a shared-memory segment), without a copy.

`jax.dlpack.from_dlpack` adopts a DLPack tensor in place; this module produces one for a raw address, so a slab
written once into exportable memory is the very buffer the owner's programs read and its peers copy from. DLPack's
own type codes carry bfloat16 and float8_e4m3fn, which CuPy's and NumPy's exporters lack.

The memory's owner object is kept alive until JAX frees the array (the DLPack deleter drops it).
"""

from __future__ import annotations

import ctypes
import threading

import jax
import jax.numpy as jnp
import numpy as np

CPU, CUDA = 1, 2  # DLDeviceType
# jnp dtype name -> DLPack (type code, bits): kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLFloat8_e4m3fn 10
_CODES = {"int8": (0, 8), "int16": (0, 16), "int32": (0, 32), "uint8": (1, 8), "uint16": (1, 16), "uint32": (1, 32),
          "float16": (2, 16), "float32": (2, 32), "bfloat16": (4, 16), "float8_e4m3fn": (10, 8)}


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32), ("dtype", _DataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Managed))
_Managed._fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]

_LIVE: dict[int, tuple] = {}  # address of each handed-out DLManagedTensor -> what must outlive the array
_LOCK = threading.Lock()


@_Deleter
def _release(managed) -> None:
    with _LOCK:
        _LIVE.pop(ctypes.addressof(managed.contents), None)


_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype = ctypes.py_object
_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class _Export:
    """The DLPack producer of one array (`__dlpack__` is called once, by `from_dlpack`)."""

    def __init__(self, address: int, shape: tuple[int, ...], dtype, device: jax.Device, keep_alive):
        self.address, self.shape, self.dtype, self.device, self.keep_alive = address, shape, dtype, device, keep_alive

    def __dlpack_device__(self) -> tuple[int, int]:
        return (CUDA if self.device.platform == "gpu" else CPU), self.device.local_hardware_id or 0

    def __dlpack__(self, stream=None, **_):
        del stream  # the bytes were written and synchronized before the export
        managed, shape = _Managed(), (ctypes.c_int64 * len(self.shape))(*self.shape)
        code, bits = _CODES[self.dtype.name]
        managed.dl_tensor = _Tensor(self.address, _Device(*self.__dlpack_device__()), len(self.shape),
                                    _DataType(code, bits, 1), shape, None, 0)
        managed.deleter = _release
        with _LOCK:
            _LIVE[ctypes.addressof(managed)] = (managed, shape, self.keep_alive)
        return _capsule(ctypes.addressof(managed), b"dltensor", None)


def array_at(address: int, shape, dtype, device: jax.Device, keep_alive) -> jax.Array:
    """The JAX array on `device` whose buffer is the `shape`/`dtype` bytes at `address` (device memory of a GPU,
    host memory for a CPU device). `keep_alive` (the allocation) lives as long as the array.

    Raises ValueError for a dtype DLPack cannot name here or an address JAX would have to copy from (it adopts
    buffers aligned to 64 bytes; the slab segments align every array to 256)."""
    dtype = jnp.dtype(dtype)
    if dtype.name not in _CODES:
        raise ValueError(f"zero-copy arrays take dtypes {sorted(_CODES)}, got {dtype.name}")
    if address % 64:
        raise ValueError(f"zero-copy arrays need 64-byte aligned addresses, got {address:#x}")
    shape = tuple(int(s) for s in shape)
    out = jax.dlpack.from_dlpack(_Export(address, shape, dtype, device, keep_alive), copy=False)
    if out.unsafe_buffer_pointer() != address or out.dtype != dtype:  # from_dlpack promises no copy with copy=False
        raise RuntimeError(f"from_dlpack copied the {dtype.name}{list(shape)} array at {address:#x}")
    return out


def size_of(shape, dtype) -> int:
    return int(np.prod(shape)) * jnp.dtype(dtype).itemsize

"""Pulls across processes on NVIDIA GPUs: owners' slabs in CUDA VMM memory the project allocates, shared with the
peers by handle (XLA's own allocations cannot be exported: cudaIpcGetMemHandle refuses them).

An owner creates one allocation per rank (`cuMemCreate`, physical memory on its GPU, exportable), maps it,
writes its slabs into it and exports a shareable handle:
  posix_fd  within a host: the file descriptor from `cuMemExportToShareableHandle`, handed to each peer over a
            Unix socket (SCM_RIGHTS) that the owner's process serves; the socket's path goes through the exchange.
  fabric    across the hosts of a multi-node NVLink domain: a 64-byte handle that travels through the exchange
            itself. Refused, with the reason, where the driver or the system does not provide it.
The owner's own programs read its slabs from the allocation (JAX arrays over the mapping, zero copy: `zero_copy`),
so the weights are held once. A peer imports the handle, maps it into its address space with read access, and sees
every layer's arrays the same way; the transports of `shared_memory` pull from them (XLA slices, or the copy engine
from inside the rank's programs).

The driver is called through ctypes on libcuda; CuPy sets the current device and copies the slabs in.
"""

from __future__ import annotations

import ctypes
import os
import socket
import tempfile
import threading

import jax

from dwdp_jax.transport import zero_copy
from dwdp_jax.transport.shared_memory import HandleError, SlabShare, segment_bytes

POSIX_FD, FABRIC = 1, 8
HANDLE_TYPES = {"posix_fd": POSIX_FD, "fabric": FABRIC}
ATTRIBUTE_FABRIC_SUPPORTED = 128


class VmmError(RuntimeError):
    pass


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_LIB = None


def driver():
    global _LIB
    if _LIB is None:
        try:
            _LIB = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise VmmError(f"CUDA VMM needs the CUDA driver (libcuda.so.1): {e}") from e
    return _LIB


def check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        driver().cuGetErrorName(result, ctypes.byref(name))
        raise VmmError(f"{what} failed: {name.value.decode() if name.value else result}")


def _current_context(ordinal: int) -> None:
    import cupy

    cupy.cuda.runtime.setDevice(ordinal)  # the runtime makes the device's primary context current on this thread
    cupy.cuda.runtime.free(0)


def _prop(ordinal: int, handle_type: int) -> _Prop:
    prop = _Prop()
    prop.type = 1  # pinned device memory
    prop.requestedHandleTypes = handle_type
    prop.location = _Location(1, ordinal)  # on device `ordinal`
    return prop


def _granularity(prop: _Prop) -> int:
    g = ctypes.c_size_t()
    check(driver().cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(prop), 0),
          "cuMemGetAllocationGranularity")
    return g.value


def _map(handle: int, size: int, ordinal: int) -> int:
    lib, ptr = driver(), ctypes.c_uint64()
    check(lib.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0), ctypes.c_uint64(0),
                                  ctypes.c_uint64(0)), "cuMemAddressReserve")
    check(lib.cuMemMap(ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), ctypes.c_uint64(handle), ctypes.c_uint64(0)),
          "cuMemMap")
    access = _AccessDesc(_Location(1, ordinal), 3)  # read-write from device `ordinal`
    check(lib.cuMemSetAccess(ptr, ctypes.c_size_t(size), ctypes.byref(access), ctypes.c_size_t(1)), "cuMemSetAccess")
    return ptr.value


def fabric_supported(ordinal: int) -> bool:
    _current_context(ordinal)
    value = ctypes.c_int()
    device = ctypes.c_int()
    check(driver().cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")
    check(driver().cuDeviceGetAttribute(ctypes.byref(value), ATTRIBUTE_FABRIC_SUPPORTED, device),
          "cuDeviceGetAttribute(HANDLE_TYPE_FABRIC_SUPPORTED)")
    return bool(value.value)


class Allocation:
    """Physical memory on one GPU mapped into this process; `owned`: created here (else imported)."""

    def __init__(self, handle: int, ptr: int, size: int, ordinal: int, owned: bool):
        self.handle, self.ptr, self.size, self.ordinal, self.owned = handle, ptr, size, ordinal, owned

    @classmethod
    def create(cls, nbytes: int, ordinal: int, kind: str = "posix_fd") -> "Allocation":
        if kind not in HANDLE_TYPES:
            raise ValueError(f"handle kind must be one of {sorted(HANDLE_TYPES)}, got {kind!r}")
        _current_context(ordinal)
        if kind == "fabric" and not fabric_supported(ordinal):
            raise VmmError(f"fabric handles are not supported on GPU {ordinal} by this driver "
                           f"(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED = 0); use kind='posix_fd' within a host")
        prop = _prop(ordinal, HANDLE_TYPES[kind])
        g = _granularity(prop)
        size = -(-max(nbytes, 1) // g) * g
        handle = ctypes.c_uint64()
        try:
            check(driver().cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(size), ctypes.byref(prop),
                                       ctypes.c_uint64(0)), f"cuMemCreate({kind})")
        except VmmError as e:
            if kind == "fabric":  # the attribute can say yes while the system (an IMEX domain) is missing
                raise VmmError(f"{e}: fabric handles need a multi-node NVLink system with its IMEX service; "
                               f"use kind='posix_fd' within a host") from e
            raise
        return cls(handle.value, _map(handle.value, size, ordinal), size, ordinal, True)

    def export_fd(self) -> int:
        fd = ctypes.c_int()
        check(driver().cuMemExportToShareableHandle(ctypes.byref(fd), ctypes.c_uint64(self.handle), POSIX_FD,
                                                    ctypes.c_uint64(0)), "cuMemExportToShareableHandle(posix_fd)")
        return fd.value

    @classmethod
    def import_fd(cls, fd: int, size: int, ordinal: int) -> "Allocation":
        _current_context(ordinal)
        handle = ctypes.c_uint64()
        check(driver().cuMemImportFromShareableHandle(ctypes.byref(handle), ctypes.c_void_p(fd), POSIX_FD),
              "cuMemImportFromShareableHandle(posix_fd)")
        os.close(fd)  # the imported handle keeps the memory alive
        return cls(handle.value, _map(handle.value, size, ordinal), size, ordinal, False)

    def array(self, offset: int, shape, dtype, device: jax.Device) -> jax.Array:
        """A JAX array on `device` over [offset, offset + its bytes) of the mapping, zero copy."""
        nbytes = zero_copy.size_of(shape, dtype)
        if offset + nbytes > self.size:
            raise ValueError(f"an array of {nbytes} bytes at offset {offset} overruns the {self.size}-byte mapping")
        return zero_copy.array_at(self.ptr + offset, shape, dtype, device, self)

    def close(self) -> None:
        lib = driver()
        lib.cuMemUnmap(ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.size))
        lib.cuMemAddressFree(ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.size))
        lib.cuMemRelease(ctypes.c_uint64(self.handle))


class FdServer:
    """Hands this process's exported descriptors to peers that connect to its Unix socket: the peer sends the key
    it wants, the server answers with the descriptor attached (SCM_RIGHTS)."""

    def __init__(self):
        self.path = os.path.join(tempfile.mkdtemp(prefix="dwdp_vmm_"), "handles.sock")
        self.fds: dict[str, int] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                key = conn.recv(256).decode()
                if key in self.fds:
                    socket.send_fds(conn, [b"ok"], [self.fds[key]])
                else:
                    conn.sendall(b"no")


def fetch_fd(path: str, key: str, timeout_s: float = 10.0) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(path)
        s.sendall(key.encode())
        message, fds, _, _ = socket.recv_fds(s, 16, 1)
        if message != b"ok" or not fds:
            raise HandleError(f"the handle server at {path} has no descriptor {key!r}")
        return fds[0]


class VmmShare(SlabShare):
    """CUDA VMM within a host (posix_fd handles); see the module docstring."""

    handle_kind = "posix_fd"
    _server: FdServer | None = None

    def _create(self, owner, layout, slabs, device):
        import cupy

        alloc = Allocation.create(segment_bytes(layout), device.local_hardware_id, self.handle_kind)
        per_layer = len(self._template.arrays())
        for i, slab in enumerate(slabs):
            for entry, a in zip(layout[i * per_layer:(i + 1) * per_layer], slab.arrays()):
                a.block_until_ready()
                cupy.cuda.runtime.memcpy(alloc.ptr + entry["offset"], a.unsafe_buffer_pointer(), a.nbytes,
                                         cupy.cuda.runtime.memcpyDeviceToDevice)
            cupy.cuda.runtime.deviceSynchronize()  # device-to-device memcpy returns before the copy ends
        if VmmShare._server is None:
            VmmShare._server = FdServer()
        key = f"{self.tag}/{owner}"
        VmmShare._server.fds[key] = alloc.export_fd()
        self._owned[owner] = alloc
        self.segments[owner] = (alloc.ptr, alloc.size)
        descriptor = dict(kind="cuda_vmm_posix_fd", socket=VmmShare._server.path, key=key, bytes=alloc.size,
                          host=socket.gethostname(), layout=layout)
        return descriptor, [alloc.array(e["offset"], e["shape"], e["dtype"], device) for e in layout]

    def _attach(self, owner, descriptor, device):
        if descriptor.get("host") != socket.gethostname():
            raise HandleError(f"owner {owner}'s posix_fd handle is on host {descriptor.get('host')}, this process "
                              f"on {socket.gethostname()}: across hosts use fabric handles")
        try:
            fd = fetch_fd(descriptor["socket"], descriptor["key"])
            alloc = Allocation.import_fd(fd, descriptor["bytes"], device.local_hardware_id)
        except (OSError, VmmError) as e:
            raise HandleError(f"owner {owner}'s VMM handle {descriptor['key']} at {descriptor['socket']} cannot be "
                              f"imported: {e}") from e
        self.segments[owner] = (alloc.ptr, alloc.size)
        return [alloc.array(e["offset"], e["shape"], e["dtype"], device) for e in descriptor["layout"]]

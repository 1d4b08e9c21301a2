"""Moving remote expert slabs between the ranks of a DWDP group (see base.py for the protocol)."""

from dwdp_jax.transport.base import Transport, TransportOptions, export_pieces
from dwdp_jax.transport.copy_engine import CopyEngineTransport
from dwdp_jax.transport.device_put import DevicePutTransport

_BACKENDS = {"device_put": DevicePutTransport, "copy_engine": CopyEngineTransport}


def register_backend(name: str, cls: type[Transport]) -> None:
    _BACKENDS[name] = cls


def transport_class(name: str) -> type[Transport]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown transport {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def make_transport(name: str, *args, **kwargs) -> Transport:
    return transport_class(name)(*args, **kwargs)


__all__ = ["Transport", "TransportOptions", "export_pieces", "make_transport", "register_backend", "transport_class"]

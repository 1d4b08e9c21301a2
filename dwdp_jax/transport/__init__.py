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


def transport_options(name: str, **fields) -> TransportOptions:
    """TransportOptions for transport `name`: each field checked once, here, against what that transport does."""
    options = TransportOptions(**fields)
    if options.slice_bytes and not transport_class(name).slices_by_bytes:
        by_bytes = " or ".join(repr(n) for n, cls in sorted(_BACKENDS.items()) if cls.slices_by_bytes)
        raise ValueError(f"slice_bytes={options.slice_bytes} needs transport={by_bytes} (transport {name!r} slices "
                         f"by count: slices)")
    return options


__all__ = ["Transport", "TransportOptions", "export_pieces", "make_transport", "register_backend", "transport_class",
           "transport_options"]

"""Tensors as raw row-major bytes, without copies where the memory already has that shape.

The byte views come from torch and ctypes alone: torch's wheel does not depend on numpy, so
``Tensor.numpy()`` fails in an environment that only installed kvckpt's own dependencies.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from kvckpt.errors import KVCheckpointError


def host_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU, contiguous tensor with the same values: only the view's own elements are kept."""
    tensor = tensor.detach()
    if tensor.is_quantized or tensor.layout != torch.strided:
        raise KVCheckpointError(
            f"kvckpt stores dense tensors; got layout={tensor.layout} dtype={tensor.dtype}: "
            "dequantize or densify it before saving"
        )
    if tensor.device.type == "meta":
        raise KVCheckpointError("cannot save a tensor on the meta device: it has no data")
    if tensor.device.type != "cpu":  # gather strided views on the device, then one copy to host
        tensor = tensor.contiguous().to("cpu")
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    return tensor.contiguous()


@functools.lru_cache(maxsize=1024)
def _byte_array_type(nbytes: int) -> type[ctypes.Array[ctypes.c_ubyte]]:
    """A ctypes array type of ``nbytes`` bytes whose instances can hold the tensor they point into.

    Built here rather than with ``c_ubyte * nbytes``: ctypes caches those types forever, one per length,
    while this cache stays bounded however many tensor sizes a job saves.
    """

    class TensorBytes(ctypes.Array):  # type: ignore[type-arg]
        _type_ = ctypes.c_ubyte
        _length_ = nbytes
        owner: torch.Tensor

    return TensorBytes


def byte_view(tensor: torch.Tensor, *, writable: bool = False) -> memoryview:
    """The bytes of a CPU contiguous tensor, sharing its memory (read-only unless ``writable``).

    The view keeps the tensor alive: memoryview -> ctypes array -> tensor, so bytes handed to a socket
    or a store never outlive the memory they point into.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(
            f"byte_view needs a CPU contiguous tensor, got {tensor.device} {tuple(tensor.stride())}"
        )
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray()) if writable else memoryview(b"")
    array = _byte_array_type(nbytes).from_address(tensor.data_ptr())
    array.owner = tensor  # type: ignore[attr-defined]
    view = memoryview(array).cast("B")  # ctypes exports "<B"; stores expect plain bytes ("B")
    return view if writable else view.toreadonly()


def writable_byte_view(tensor: torch.Tensor) -> memoryview | None:
    """The tensor's own memory when reads can land in it directly, else None."""
    if (
        tensor.device.type != "cpu"
        or not tensor.is_contiguous()
        or tensor.is_conj()
        or tensor.is_neg()
        or tensor.is_quantized
        or tensor.layout != torch.strided
    ):
        return None
    return byte_view(tensor.detach(), writable=True)


def contiguous_span(
    shape: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...]
) -> tuple[int, int] | None:
    """Element range [start, stop) of the region when it is one contiguous run in row-major order."""
    dims = len(shape)
    if dims == 0:
        return (0, 1)
    # Past the first dim with length > 1 every dim must be taken whole.
    first = next((d for d in range(dims) if lengths[d] != 1), dims)
    for d in range(first + 1, dims):
        if offsets[d] != 0 or lengths[d] != shape[d]:
            return None
    start, stride = 0, 1
    for d in reversed(range(dims)):
        start += offsets[d] * stride
        stride *= shape[d]
    count = 1
    for n in lengths:
        count *= n
    return (start, start + count)


def row_slab(shape: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...]) -> tuple[int, int]:
    """Element range [start, stop) of the whole dim-0 slices holding the region: always one run."""
    row = math.prod(shape[1:])
    return offsets[0] * row, (offsets[0] + lengths[0]) * row

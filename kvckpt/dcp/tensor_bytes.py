"""Tensors as raw row-major bytes, without copies where the memory already has that shape."""

from __future__ import annotations

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


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, sharing its memory."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())  # type: ignore[arg-type]  # ndarray exports the buffer protocol


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
    return byte_view(tensor.detach())


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

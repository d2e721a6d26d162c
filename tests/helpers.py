"""Small helpers shared by the DCP tests."""

from __future__ import annotations

import torch

QUANTIZED = {torch.qint8, torch.qint32, torch.quint8, torch.quint4x2, torch.quint2x4}


def _dcp_can_plan(dtype: torch.dtype) -> bool:
    """DCP's own planner sizes items with this; the bits*/int1-7/uint1-7 placeholders fail there."""
    try:
        torch._utils._element_size(dtype)  # type: ignore[no-untyped-call]
    except TypeError:
        return False
    return True


#: Every dtype DCP can checkpoint: float8/float4 variants, bfloat16, complex, bool, unsigned, ...
ALL_DTYPES = sorted(
    dict.fromkeys(
        d
        for d in vars(torch).values()
        if isinstance(d, torch.dtype) and d not in QUANTIZED and _dcp_can_plan(d)
    ),
    key=str,
)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bits of any dtype (made as bytes, then viewed), so every bit pattern is exercised."""
    gen = torch.Generator().manual_seed(seed)
    element = torch.empty((), dtype=dtype).element_size()
    count = 1
    for n in shape:
        count *= n
    raw = torch.randint(0, 256, (count * element,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs and -0.0 included), for any dtype."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )

"""Device, dtype and distributed-backend choice: the one place that knows about hardware.

Everything else asks this module for a `torch.device`, a `torch.dtype` or a backend name,
so the same code runs on CPU, CUDA and any device PyTorch has a backend for (e.g. Ascend
NPUs through torch_npu, where the backend is hccl).
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda", "npu", "mps")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl", "mps": "gloo"}


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """Map `--device cpu|cuda|npu|mps|auto` (optionally with an index, `cuda:1`) to a device.

    Example: `resolve_device("auto")` -> `device(type="cuda")` on a GPU box, `cpu` elsewhere.
    """
    base = name.split(":")[0]
    if base not in DEVICES:
        raise ValueError(f"--device: unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _npu_available():
            return torch.device("npu")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device: 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu"
        )
    if base == "npu" and not _npu_available():
        raise ValueError("--device: 'npu' was asked for but torch_npu is not installed or sees no NPU")
    if base == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device: 'mps' was asked for but torch.backends.mps is not available")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype = "fp32") -> torch.dtype:
    """Map `--dtype fp32|bf16|fp16` (or a torch.dtype) to a torch.dtype.

    Example: `resolve_dtype("bf16")` -> `torch.bfloat16`.
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype: unsupported {name}; use one of {', '.join(DTYPES)}")
        return name
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    key = aliases.get(str(name), str(name))
    if key not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dist_backend(device: torch.device | str) -> str:
    """The torch.distributed backend that follows the device: gloo (cpu), nccl (cuda), hccl (npu).

    Example: `dist_backend("cuda")` -> `"nccl"`.
    """
    kind = torch.device(device).type
    return _BACKENDS.get(kind, "gloo")

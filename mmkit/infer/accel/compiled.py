"""Fused RoPE / RMSNorm / AdaLN-modulation kernels on CUDA through regional compilation.

Each repeated block is compiled on its own (`nn.Module.compile`: one graph reused by every block, so
compile time does not grow with depth); inductor fuses the elementwise chains around the matmuls
(q/k RMSNorm + RoPE + head layout, LayerNorm + modulation, gated residual adds) into Triton kernels.
On CPU (and other devices) nothing changes: the eager path is kept, as inductor's CPU code was not
measured to help here. Install caches first: a cache's skip decision stays in Python, outside the
compiled region.
"""

from __future__ import annotations

from torch import nn

from mmkit.infer.accel.cache.common import repeated_blocks


def apply_compiled_blocks(transformer: nn.Module, mode: str | None = None, force: bool = False) -> bool:
    """Compile each repeated block on CUDA; returns whether anything was compiled.

    Example: `apply_compiled_blocks(pipe.transformer)  # False on CPU: the eager path is kept`.
    """
    device = next(transformer.parameters()).device
    if device.type != "cuda" and not force:
        return False
    for block in repeated_blocks(transformer):
        block.compile(mode=mode, dynamic=False)
    return True


def remove_compiled_blocks(transformer: nn.Module) -> None:
    """Back to eager blocks. Example: `remove_compiled_blocks(pipe.transformer)`."""
    for block in repeated_blocks(transformer):
        block.__dict__.pop("_compiled_call_impl", None)

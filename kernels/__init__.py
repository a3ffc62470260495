"""Fused Triton kernels with plain-torch references (docs/design.md, "Kernels").

Public functions dispatch on the backend switch (set_backend / $HVP_KERNEL_BACKEND: auto | triton |
torch); the *_reference functions are the plain-torch definitions and the CPU path.
"""

from ._dispatch import BACKENDS, ENV_VAR, HAS_TRITON, get_backend, set_backend, using_backend
from .convlstm import convlstm_cell, convlstm_cell_reference
from .onehot import (argmax_onehot, argmax_onehot_reference, onehot_conv3x3, onehot_conv3x3_reference,
                     onehot_reference)
from .warp import warp, warp_blend, warp_blend_reference, warp_reference

__all__ = [
    "BACKENDS", "ENV_VAR", "HAS_TRITON", "get_backend", "set_backend", "using_backend",
    "convlstm_cell", "convlstm_cell_reference",
    "warp", "warp_reference", "warp_blend", "warp_blend_reference",
    "argmax_onehot", "argmax_onehot_reference", "onehot_conv3x3", "onehot_conv3x3_reference",
    "onehot_reference",
]

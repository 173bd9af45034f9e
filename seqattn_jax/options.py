"""`AttentionOptions`: the attention options, given once (to `plan_*`) and validated here only.

Every backend reads the same frozen value: the plan carries it to every run of the step, so a run
cannot disagree with its plan. The field rules below are the package's only copy; the reference
module (`seqattn_jax.reference`, which also accepts traced scalars) calls the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

__all__ = ["DECODE_KERNELS", "POS_ENCODING_MODES", "AttentionOptions"]

POS_ENCODING_MODES = ("NONE", "ROPE_LLAMA", "ALIBI")
DECODE_KERNELS = ("auto", "tensor_core", "cuda_core")


def is_number(x) -> bool:
    """A static real number (Python or numpy scalar), not a bool."""
    return isinstance(x, (numbers.Real, np.floating, np.integer)) and \
        not isinstance(x, (bool, np.bool_))


def check_pos_encoding_mode(value) -> str:
    if not isinstance(value, str) or value not in POS_ENCODING_MODES:
        raise ValueError(f"pos_encoding_mode must be one of {POS_ENCODING_MODES}, got {value!r}")
    return value


def check_window_left(value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < -1:
        raise ValueError(f"window_left must be a Python int >= -1 (-1 disables the window), "
                         f"got {value!r}")
    return int(value)


def check_soft_cap(value) -> float:
    if not is_number(value) or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"logits_soft_cap must be a static finite float >= 0 (0 disables it), "
                         f"got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_positive_float(name: str, value) -> float:
    """A positive finite static float (AttentionOptions' sm_scale / rope_scale / rope_theta)."""
    if not is_number(value) or not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a positive finite Python float, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """The attention options of a plan and of every run that uses it. Frozen and hashable (jit
    keys on it through the plan's static metadata); every field is a plain Python value.

    Attributes:
      sm_scale: softmax scale; None means `1 / sqrt(head_dim)`.
      logits_soft_cap: `cap * tanh(s / cap)` on the logits; 0 disables it.
      window_left: sliding window (keys `>= query_pos - window_left`); -1 disables it.
      pos_encoding_mode: "NONE", "ROPE_LLAMA" (in-kernel RoPE on q and k) or "ALIBI".
      rope_scale, rope_theta: RoPE's parameters (ROPE_LLAMA only).
      return_lse: runs also return the base-2 log-sum-exp ([rows, Hq] float32).
      decode_kernel: decode plans: "auto", "tensor_core" or "cuda_core" (FlashInfer's choice of
        kernel; the reference ignores it).
      causal: prefill plans and the prefill part of POD / batch POD; decode ignores it.
    """

    sm_scale: float | None = None
    logits_soft_cap: float = 0.0
    window_left: int = -1
    pos_encoding_mode: str = "NONE"
    rope_scale: float = 1.0
    rope_theta: float = 1e4
    return_lse: bool = False
    decode_kernel: str = "auto"
    causal: bool = True

    def __post_init__(self):
        fields = dict(
            sm_scale=None if self.sm_scale is None else check_positive_float("sm_scale",
                                                                               self.sm_scale),
            logits_soft_cap=check_soft_cap(self.logits_soft_cap),
            window_left=check_window_left(self.window_left),
            pos_encoding_mode=check_pos_encoding_mode(self.pos_encoding_mode),
            rope_scale=check_positive_float("rope_scale", self.rope_scale),
            rope_theta=check_positive_float("rope_theta", self.rope_theta),
            return_lse=check_bool("return_lse", self.return_lse),
            causal=check_bool("causal", self.causal),
        )
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, "
                             f"got {self.decode_kernel!r}")
        for name, value in fields.items():   # normalised to Python types: equal options hash equal
            object.__setattr__(self, name, value)

    def scale(self, head_dim: int) -> float:
        """The softmax scale for `head_dim` (sm_scale, or its default `1 / sqrt(head_dim)`)."""
        return 1.0 / math.sqrt(head_dim) if self.sm_scale is None else self.sm_scale

    def replace(self, **changes) -> "AttentionOptions":
        return dataclasses.replace(self, **changes)

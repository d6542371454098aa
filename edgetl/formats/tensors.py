"""Arithmetic on model inputs and outputs that every runtime shares: softmax, (de)quantization, descriptions."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a (N, classes) array, stable for large logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """Float → integer tensor with a tensor's (scale, zero_point), rounded and clipped to the dtype."""
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (q.astype(np.float32) - zero_point) * np.float32(scale)


def tensor_info(name: str, dtype: str, shape: list[int], scale: float = 0.0, zero_point: int = 0) -> dict:
    """A tensor as manifests record it: quantization None for float tensors."""
    return {"name": name, "dtype": dtype, "shape": [int(v) for v in shape],
            "quantization": {"scale": float(scale), "zero_point": int(zero_point)} if scale else None}

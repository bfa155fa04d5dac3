"""PyTorch state dict -> Flax variables, with precise errors.

Every model port describes how a Flax variable path is named in its PyTorch state
dict; :func:`torch_to_flax` walks the Flax template (shapes from ``jax.eval_shape``),
fetches each tensor, converts its layout and checks its shape. All missing,
unexpected and mis-shaped tensors are reported together in one error.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from la_iprop.models.checkpoint import CheckpointError

__all__ = ["ConversionError", "torch_to_flax", "default_torch_name"]

# Flax leaf name -> PyTorch tensor name.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var", "embedding": "weight"}

# Tensors that carry no information for inference.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


class ConversionError(CheckpointError):
    """A state dict that does not match the architecture it is converted to."""


def default_torch_name(path: tuple[str, ...]) -> str:
    """``('params', 'layer1_0', 'conv1', 'kernel')`` -> ``'layer1.0.conv1.weight'``.

    Flax module names use ``_`` where PyTorch uses ``.`` before a list index, so
    ``name_3`` becomes ``name.3``; a leading ``_`` is kept (``_blocks``).
    """
    *modules, leaf = path[1:]
    parts = []
    for module in modules:
        head, sep, tail = module.rpartition("_")
        parts.append(f"{head}.{tail}" if sep and head and tail.isdigit() else module)
    parts.append(_LEAF_NAMES.get(leaf, leaf))
    return ".".join(parts)


def _to_flax_layout(tensor: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Converts PyTorch layouts to Flax ones by rank (conv OIHW -> HWIO, linear OI -> IO)."""
    if tensor.ndim == 4 and len(target_shape) == 4:
        return tensor.transpose(2, 3, 1, 0)
    if tensor.ndim == 4 and len(target_shape) == 3 and tensor.shape[1] == 1:
        return tensor[:, 0].transpose(1, 2, 0)  # depthwise [C,1,kh,kw] -> [kh,kw,C]
    if tensor.ndim == 2 and len(target_shape) == 2 and tensor.shape[::-1] == tuple(target_shape):
        return tensor.T
    return tensor


def torch_to_flax(template: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                  torch_name: Callable[[tuple[str, ...]], str] = default_torch_name,
                  *, architecture: str = "model") -> dict:
    """Fills a Flax variable tree (``template``: arrays or ShapeDtypeStructs) from a state dict."""
    flat = traverse_util.flatten_dict(dict(template))
    out, missing, misshaped, used = {}, [], [], set()
    for path, leaf in flat.items():
        name = torch_name(path)
        if name not in state_dict:
            missing.append(f"{name} (for {'/'.join(path)}, shape {tuple(leaf.shape)})")
            continue
        used.add(name)
        value = _to_flax_layout(np.asarray(state_dict[name]), tuple(leaf.shape))
        if value.shape != tuple(leaf.shape):
            misshaped.append(f"{name}: checkpoint {tuple(state_dict[name].shape)}, "
                             f"{architecture} expects {tuple(leaf.shape)} (after layout conversion)")
            continue
        out[path] = value.astype(leaf.dtype)
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if missing or misshaped or unexpected:
        lines = [f"the checkpoint does not match {architecture}:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {len(items)} {title} tensor(s): " + "; ".join(shown))
        raise ConversionError("\n".join(lines))
    return jax.tree_util.tree_map(np.asarray, traverse_util.unflatten_dict(out))

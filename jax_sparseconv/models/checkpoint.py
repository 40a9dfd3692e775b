"""Open3D-ML ``SparseConvUnet`` weights: load its checkpoints (torch-free, through
:mod:`jax_sparseconv.models.torch_file`) and map the state_dict to Flax variables (and
back).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jax_sparseconv.models.torch_file import batchnorm_state, load_torch_checkpoint, read_torch_file

__all__ = ["load_open3d_ml_checkpoint", "read_torch_file", "open3d_ml_variables",
           "to_open3d_ml_state_dict"]


def load_open3d_ml_checkpoint(path_or_file) -> dict[str, np.ndarray]:
  """An Open3D-ML checkpoint's model state_dict as ``{name: numpy array}``, without torch.

  Accepts what Open3D-ML's pipeline saves (``torch.save({'epoch': ..., 'model_state_dict':
  ..., 'optimizer_state_dict': ..., ...})``) and a bare ``torch.save(model.state_dict())``,
  in the zip or the legacy format (:func:`~jax_sparseconv.models.load_torch_checkpoint`).
  Pass the result to :func:`open3d_ml_variables`.
  """
  return load_torch_checkpoint(path_or_file)


# ---------------------------------------------------------------------------------------------
# state_dict <-> Flax variables

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _flax_path(key: str):
  """Maps a state_dict key to ``(collection, path tuple, transform)`` or None (dropped).

  ``unet.net.{i}`` -> ``unet/net_{i}``; a conv's ``.net.kernel`` -> ``kernel`` (its
  ``.net.offset`` buffer is checked and dropped); BatchNorm ``.bn.{weight, bias,
  running_mean, running_var}`` -> ``scale, bias`` (params) and ``mean, var``
  (batch_stats), ``num_batches_tracked`` dropped; ``linear.linear.{weight, bias}`` and a
  residual block's ``lin.linear.weight`` -> Dense ``kernel`` (transposed) / ``bias``.
  """
  parts = key.split(".")
  out, i = [], 0
  while i < len(parts):
    if parts[i] == "net" and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"net_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  leaf = out[-1]
  if len(out) >= 2 and out[-2] == "net" and leaf in ("kernel", "offset"):
    if leaf == "offset":
      return "offset", tuple(out[:-2]), None
    return "params", tuple(out[:-2]) + ("kernel",), None
  if len(out) >= 2 and out[-2] == "bn":
    if leaf == "num_batches_tracked":
      return None
    if leaf in _BN_LEAVES:
      col, name = _BN_LEAVES[leaf]
      return col, tuple(out[:-2]) + (name,), None
  if len(out) >= 3 and out[-2] == "linear" and out[-3] in ("linear", "lin"):
    if leaf == "weight":
      return "params", tuple(out[:-2]) + ("kernel",), "T"
    if leaf == "bias":
      return "params", tuple(out[:-2]) + ("bias",), None
  raise KeyError(key)


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  if path[-1] in tree:
    raise ValueError(f"two state_dict entries map to {'/'.join(path)}")
  tree[path[-1]] = value


def open3d_ml_variables(state_dict: Mapping[str, Any]) -> dict[str, dict]:
  """Flax variables of :class:`~jax_sparseconv.models.SparseConvUnet` from an Open3D-ML
  ``SparseConvUnet`` state_dict (e.g. from :func:`load_open3d_ml_checkpoint`, or torch
  tensors converted with ``.numpy()``).

  Sparse-conv kernels keep Open3D's ``(Kz, Ky, Kx, Cin, Cout)`` layout unchanged; Linear
  weights are transposed to Dense kernels; BatchNorm ``weight/bias`` become
  ``scale/bias`` and ``running_mean/var`` the ``batch_stats`` ``mean/var``. The conv
  ``offset`` buffers must hold Open3D-ML's values (0 for ``K=3``, -0.5 for ``K=2``: the
  model's maps assume them); ``num_batches_tracked`` is dropped. A ``module.`` prefix
  (``DataParallel``) is stripped.

  Args:
    state_dict: ``{name: array}`` with Open3D-ML's names (``unet.net.{i}...``).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (float32 jax arrays), ready for
    ``model.apply``. The model's configuration (multiplier, reps, residual) must match
    the weights; ``model.init`` gives the same tree.

  Raises:
    ValueError: for names that do not belong to this model, or unexpected offsets.
  """
  variables = {"params": {}, "batch_stats": {}}
  unknown = []
  for key, value in state_dict.items():
    key = str(key)
    if key.startswith("module."):
      key = key[len("module."):]
    arr = np.asarray(value)
    try:
      target = _flax_path(key)
    except KeyError:
      unknown.append(key)
      continue
    if target is None:
      continue
    col, path, how = target
    if col == "offset":
      k = state_dict.get(key.replace(".offset", ".kernel"))
      if k is None:
        k = state_dict.get("module." + key.replace(".offset", ".kernel"))
      ksize = None if k is None else np.shape(k)[0]
      want = {3: 0.0, 2: -0.5}.get(ksize)
      if arr.shape != (3,) or want is None or not np.all(arr == want):
        raise ValueError(f"{key} = {arr.tolist()} for kernel size {ksize}: this model only "
                         "supports Open3D-ML's offsets (0 for K=3, -0.5 for K=2)")
      continue
    arr = arr.astype(np.float32)
    if how == "T":
      arr = arr.T
    _set(variables[col], path, jnp.asarray(arr))
  if unknown:
    raise ValueError(f"state_dict entries that are not part of SparseConvUnet: {unknown[:10]}"
                     f"{' ...' if len(unknown) > 10 else ''}")
  return variables


def to_open3d_ml_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of :func:`open3d_ml_variables`: an Open3D-ML state_dict (NumPy arrays,
  with the conv ``offset`` buffers and ``num_batches_tracked`` = 0) from Flax variables,
  e.g. to load fine-tuned weights back into Open3D-ML with
  ``model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``."""
  out = {}
  params = variables["params"]
  stats = variables.get("batch_stats", {})

  def torch_prefix(path):
    return ".".join(p.replace("net_", "net.") if p.startswith("net_") else p for p in path)

  def walk(tree, path):
    if "kernel" in tree and np.ndim(tree["kernel"]) == 5:
      k = np.asarray(tree["kernel"])
      pre = torch_prefix(path)
      out[pre + ".net.kernel"] = k
      out[pre + ".net.offset"] = np.full((3,), 0.0 if k.shape[0] % 2 else -0.5, np.float32)
    elif "scale" in tree:
      out.update(batchnorm_state(tree, stats, path, torch_prefix(path) + ".bn"))
    elif "kernel" in tree and np.ndim(tree["kernel"]) == 2:
      pre = torch_prefix(path) + ".linear"
      out[pre + ".weight"] = np.asarray(tree["kernel"]).T.copy()
      if "bias" in tree:
        out[pre + ".bias"] = np.asarray(tree["bias"])
    else:
      for name in tree:
        walk(tree[name], path + (name,))

  walk(params, ())
  return out

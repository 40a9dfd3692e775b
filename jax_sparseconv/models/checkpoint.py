"""Open3D-ML ``SparseConvUnet`` weights: read ``torch.save`` files without torch, and map
the state_dict to Flax variables (and back).

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive: ``<root>/data.pkl`` (a pickle
whose tensors are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)`` calls over *persistent* storages ``('storage', <dtype>Storage, key, location,
numel)``), the raw bytes of every storage in ``<root>/data/<key>``, and
``<root>/byteorder``. :func:`load_open3d_ml_checkpoint` unpickles it with a restricted
``Unpickler`` that knows only these names (so a checkpoint cannot run code) and builds
NumPy arrays from the storages.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["load_open3d_ml_checkpoint", "read_torch_file", "open3d_ml_variables",
           "to_open3d_ml_state_dict"]

# torch storage class -> NumPy dtype
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands for ``torch.<Name>Storage`` inside the pickle."""

  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """``torch._utils._rebuild_tensor_v2`` as a NumPy copy of the strided view."""
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[storage_offset])
  n = 1 + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else 0
  if storage_offset + n > storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset "
                                 f"{storage_offset} exceeds its storage of {storage.size}")
  flat = storage[storage_offset:]
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat, shape=size, strides=[s * item for s in stride])
  return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "complex"): complex,
}


class _TorchUnpickler(pickle.Unpickler):
  """Rebuilds tensors as NumPy arrays; refuses every other global."""

  def __init__(self, file, read_storage):
    super().__init__(file)
    self._read_storage = read_storage
    self._storages = {}

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    fn = _ALLOWED.get((module, name))
    if fn is None:
      raise pickle.UnpicklingError(
          f"refusing to load global {module}.{name} (not a tensor or container); only "
          "plain state_dict / checkpoint dictionaries are supported")
    return fn

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    if key not in self._storages:
      self._storages[key] = self._read_storage(key, storage_type.dtype)
    return self._storages[key]


def read_torch_file(path_or_file) -> Any:
  """Reads a ``torch.save`` zip file into Python containers of NumPy arrays, without torch.

  Tensors of float32/float64/float16/bfloat16 (as ``ml_dtypes.bfloat16``), int64/int32/
  int16/int8/uint8 and bool become NumPy arrays (views are copied out of their shared
  storages); dicts, ``OrderedDict``s, lists, tuples and Python scalars are kept. Any
  other pickled global raises ``pickle.UnpicklingError``. The legacy (pre-1.6,
  non-zip) format is not supported.

  Args:
    path_or_file: a path or a binary file object.
  """
  if isinstance(path_or_file, (str, os.PathLike)):
    with open(path_or_file, "rb") as f:
      return read_torch_file(io.BytesIO(f.read()))
  if not zipfile.is_zipfile(path_or_file):
    raise ValueError("not a torch.save zip archive (files saved with "
                     "_use_new_zipfile_serialization=False are not supported)")
  with zipfile.ZipFile(path_or_file) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise ValueError(f"expected one <root>/data.pkl in the archive, found {pkl}")
    root = pkl[0][:-len("data.pkl")]
    order = "little"
    if root + "byteorder" in names:
      order = zf.read(root + "byteorder").decode().strip()

    def read_storage(key, dtype):
      arr = np.frombuffer(zf.read(f"{root}data/{key}"), dtype=dtype)
      return arr.byteswap() if order == "big" and dtype.itemsize > 1 else arr

    return _TorchUnpickler(io.BytesIO(zf.read(pkl[0])), read_storage).load()


def load_open3d_ml_checkpoint(path_or_file) -> dict[str, np.ndarray]:
  """An Open3D-ML checkpoint's model state_dict as ``{name: numpy array}``, without torch.

  Accepts what Open3D-ML's pipeline saves (``torch.save({'epoch': ..., 'model_state_dict':
  ..., 'optimizer_state_dict': ..., ...})``) and a bare ``torch.save(model.state_dict())``.
  Pass the result to :func:`open3d_ml_variables`.
  """
  obj = read_torch_file(path_or_file)
  if isinstance(obj, Mapping) and "model_state_dict" in obj:
    obj = obj["model_state_dict"]
  if not isinstance(obj, Mapping) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise ValueError("the file holds neither a state_dict nor a dict with 'model_state_dict'")
  return {str(k): v for k, v in obj.items()}


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
      pre = torch_prefix(path) + ".bn"
      st = stats
      for p in path:
        st = st[p]
      out[pre + ".weight"] = np.asarray(tree["scale"])
      out[pre + ".bias"] = np.asarray(tree["bias"])
      out[pre + ".running_mean"] = np.asarray(st["mean"])
      out[pre + ".running_var"] = np.asarray(st["var"])
      out[pre + ".num_batches_tracked"] = np.zeros((), np.int64)
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

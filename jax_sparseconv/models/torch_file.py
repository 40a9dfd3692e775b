"""Read ``torch.save`` files (checkpoints, state dicts) without torch, into NumPy arrays.

Two formats exist, and the model zoos ship both:

* **zip** (the default since PyTorch 1.6; e.g. Pointcept, Open3D-ML, SPVNAS): an
  uncompressed zip archive with ``<root>/data.pkl``, a pickle of the saved object, the
  raw bytes of every storage in ``<root>/data/<key>`` and ``<root>/byteorder``
  (``little`` or ``big``; little when absent), plus version records that are not needed.
* **legacy** (``_use_new_zipfile_serialization=False``, e.g. OpenPCDet): five
  pickles/blobs one after the other: the magic number ``0x1950A86A20F9469CFC6C``, the
  protocol version ``1001``, a ``sys_info`` dict, the main pickle, the list of storage
  keys; then, for each key of that list in order, the storage as an int64 element count
  followed by its raw bytes (always little-endian).

In both, a tensor is pickled as a call ``torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`` (``_v3``, with
a dtype argument, for the newer dtypes such as ``uint16``) whose storage is a pickle
*persistent id* ``('storage', <dtype>Storage, key, location, numel)`` (legacy: a sixth
``view_metadata`` entry). :func:`read_torch_file` unpickles with a restricted
``Unpickler`` that resolves only the globals of ``_ALLOWED`` / ``_TORCH_TYPES`` (tensor
rebuilding, storage and dtype names, containers, NumPy scalars and arrays), so reading a
file cannot run code, and copies every tensor out of its storage as a NumPy array.
:func:`load_torch_checkpoint` picks the model state dict out of a checkpoint.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["read_torch_file", "load_torch_checkpoint", "strip_prefixes"]

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

#: ``torch.<Name>Storage`` -> NumPy dtype (``UntypedStorage`` holds raw bytes).
_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
#: ``torch.<dtype>`` -> NumPy dtype.
_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}
_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
             "_rebuild_parameter", "_rebuild_parameter_with_state")


class _TorchType:
  """Stands for a torch class or dtype inside the pickle (never called nor built)."""

  __slots__ = ("name", "dtype")

  def __init__(self, name, dtype=None):
    self.name, self.dtype = name, None if dtype is None else np.dtype(dtype)

  def __call__(self, *args, **kwargs):
    raise pickle.UnpicklingError(f"refusing to call {self.name}")

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"refusing to set the state of {self.name}")

  def __repr__(self):
    return self.name


def _np_dtype(spec, align=False, copy=True):
  dtype = np.dtype(spec, align, copy)
  if dtype.hasobject:
    raise pickle.UnpicklingError(f"refusing NumPy object dtype {dtype}")
  return dtype


def _np_scalar(dtype, data):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise pickle.UnpicklingError("unsupported NumPy scalar")
  return np.frombuffer(data, dtype, count=1)[0]


def _np_reconstruct(cls, shape, typecode):
  if not (isinstance(cls, _TorchType) and cls.name == "numpy.ndarray"):
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
  return np.ndarray(shape, _np_dtype(typecode))  # then BUILD: ndarray.__setstate__


def _encode(text, encoding="utf-8"):  # how protocol 2 pickles bytes
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
    raise pickle.UnpicklingError("unsupported _codecs.encode call")
  return text.encode(encoding)


#: (module, name) -> what the pickle gets (besides ``_TORCH_TYPES`` and the rebuilds).
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "tuple"): tuple, ("builtins", "list"): list, ("builtins", "dict"): dict,
    ("builtins", "int"): int, ("builtins", "float"): float, ("builtins", "bool"): bool,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _encode,
    ("torch", "Size"): tuple,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
}
#: classes that may appear only as arguments (``_rebuild_from_type_v2``, ``_reconstruct``).
_TORCH_TYPES = {("torch", "Tensor"), ("torch._tensor", "Tensor"),
                ("torch.nn.parameter", "Parameter"), ("numpy", "ndarray")}


class _Unpickler(pickle.Unpickler):
  """Rebuilds tensors as NumPy arrays; refuses every global not listed above.

  ``new_storage(key, dtype, numel)`` returns the 1-D array of a storage; it may be filled
  only later (legacy format), so tensors are allocated here and copied by :meth:`fill`.
  """

  def __init__(self, file, new_storage=None, swap=False):
    super().__init__(file)
    self._new_storage, self._swap = new_storage, swap
    self.storages, self._views, self._pending = {}, {}, []

  def find_class(self, module, name):
    module = {"__builtin__": "builtins"}.get(module, module)  # protocol 2 from Python 3
    if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGES:
      return _TorchType(f"torch.{name}", _STORAGES[name])
    if module == "torch" and name in _DTYPES:
      return _TorchType(f"torch.{name}", _DTYPES[name])
    if (module, name) in _TORCH_TYPES:
      return _TorchType(f"{module}.{name}")
    if module == "torch._utils" and name in _REBUILDS:
      return getattr(self, name)
    if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
      return self._rebuild_from_type_v2
    if (module, name) in _ALLOWED:
      return _ALLOWED[module, name]
    raise pickle.UnpicklingError(
        f"refusing to load global {module}.{name} (not a tensor, container or scalar); only "
        "plain state dicts and checkpoint dictionaries can be read without torch")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], _TorchType) and pid[1].name.endswith("Storage")
            and self._new_storage is not None):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    stype, key, numel = pid[1], _str(pid[2]), int(pid[4])
    if key not in self.storages:
      self.storages[key] = self._new_storage(key, stype.dtype, numel)
    storage = self.storages[key]
    if len(pid) == 6 and pid[5] is not None:  # legacy storage view (pre-1.0 files)
      view_key, offset, size = pid[5]
      storage = self._views.setdefault(_str(view_key), storage[offset:offset + size])
    return storage

  def _tensor(self, storage, offset, size, stride, dtype=None, metadata=None):
    if not isinstance(storage, np.ndarray) or storage.ndim != 1 or storage.dtype.hasobject:
      raise pickle.UnpicklingError(f"a tensor's storage must be a storage, not {storage!r}")
    dtype = storage.dtype if dtype is None else dtype.dtype
    flat = storage if storage.dtype == dtype else storage.view(dtype)  # _v3: raw bytes
    size, stride, offset = tuple(map(int, size)), tuple(map(int, stride)), int(offset)
    stride = stride if size else ()  # a 0-d tensor's stride does not matter
    need = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if (len(stride) != len(size) or offset < 0 or min(stride, default=0) < 0
        or (0 not in size and need > flat.size)):
      raise ValueError(f"corrupt file: a tensor of size {size}, stride {stride}, offset "
                       f"{offset} does not fit its storage of {flat.size} elements")
    if set(metadata or {}) - {"neg", "conj"}:
      raise ValueError(f"unsupported tensor metadata {metadata}")
    out = np.empty(size, dtype)
    self._pending.append((out, flat, offset, stride, flat is not storage, dict(metadata or {})))
    return out

  def _rebuild_tensor(self, storage, storage_offset, size, stride):
    return self._tensor(storage, storage_offset, size, stride)

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):
    return self._tensor(storage, storage_offset, size, stride, None, metadata)

  def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad,
                         backward_hooks, dtype, metadata=None):
    if not (isinstance(dtype, _TorchType) and dtype.dtype is not None):
      raise pickle.UnpicklingError(f"unsupported tensor dtype {dtype!r}")
    return self._tensor(storage, storage_offset, size, stride, dtype, metadata)

  def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
    return data

  def _rebuild_parameter_with_state(self, data, requires_grad=False, backward_hooks=None,
                                    state=None):
    return data

  def _rebuild_from_type_v2(self, func, new_type, args, state):
    if getattr(func, "__self__", None) is not self or not isinstance(new_type, _TorchType):
      raise pickle.UnpicklingError(f"unsupported tensor subclass rebuild {func!r}, {new_type!r}")
    return func(*args)

  def fill(self):
    """Copies every tensor out of its (now loaded) storage."""
    for out, flat, offset, stride, raw, metadata in self._pending:
      if out.size:
        out[...] = np.lib.stride_tricks.as_strided(
            flat[offset:], out.shape, [s * out.itemsize for s in stride], writeable=False)
      if self._swap and raw and out.itemsize > 1:
        out.byteswap(inplace=True)  # raw-byte storages are not swapped when read
      if metadata.get("neg"):
        np.negative(out, out=out)
      if metadata.get("conj"):
        np.conjugate(out, out=out)


def _str(key):
  return key.decode("ascii") if isinstance(key, bytes) else str(key)


def _read_zip(buf):
  with zipfile.ZipFile(buf) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise ValueError(f"not a torch.save zip archive: expected one <root>/data.pkl, found "
                       f"{pkl} (TorchScript archives are not supported)")
    root = pkl[0][:-len("data.pkl")]
    order = "little"
    if root + "byteorder" in names:
      order = zf.read(root + "byteorder").decode().strip()
      if order not in ("little", "big"):
        raise ValueError(f"unknown byteorder record {order!r}")
    swap = order != sys.byteorder

    def new_storage(key, dtype, numel):
      try:
        data = zf.read(f"{root}data/{key}")
      except KeyError:
        raise ValueError(f"corrupt file: storage record {root}data/{key} is missing") from None
      if len(data) != numel * dtype.itemsize:
        raise ValueError(f"corrupt file: storage {key} holds {len(data)} bytes, expected "
                         f"{numel} x {dtype.itemsize}")
      arr = np.frombuffer(data, dtype)
      return arr.byteswap() if swap and dtype.itemsize > 1 else arr

    up = _Unpickler(io.BytesIO(zf.read(pkl[0])), new_storage, swap)
    obj = up.load()
  up.fill()
  return obj


def _read_legacy(buf):
  try:
    magic = _Unpickler(buf).load()
  except Exception:
    magic = None
  if magic != _MAGIC_NUMBER:
    raise ValueError("not a torch.save file: neither a zip archive nor the legacy format "
                     "(the pre-0.4 tar format is not supported)")
  protocol = _Unpickler(buf).load()
  if protocol != _PROTOCOL_VERSION:
    raise ValueError(f"unsupported legacy torch.save protocol version {protocol}")
  _Unpickler(buf).load()  # sys_info: sizes of C types, machine byte order

  def new_storage(key, dtype, numel):
    if not 0 <= numel * dtype.itemsize <= len(buf.getbuffer()) - buf.tell():
      raise ValueError(f"truncated or corrupt file: storage {key} of {numel} elements")
    return np.empty(numel, dtype)

  up = _Unpickler(buf, new_storage, sys.byteorder != "little")
  obj = up.load()
  keys = [_str(k) for k in _Unpickler(buf).load()]
  if sorted(keys) != sorted(up.storages):
    raise ValueError(f"corrupt file: the storages {keys} are not those of the pickle")
  for key in keys:
    storage = up.storages[key]
    head = buf.read(8)
    data = buf.read(storage.nbytes)
    if len(head) < 8 or len(data) < storage.nbytes:
      raise ValueError(f"truncated file: storage {key} ends early")
    (numel,) = struct.unpack("<q", head)
    if numel != storage.size:
      raise ValueError(f"corrupt file: storage {key} has {numel} elements, expected {storage.size}")
    storage[...] = np.frombuffer(data, storage.dtype)
    if sys.byteorder != "little" and storage.itemsize > 1:  # legacy storages are little-endian
      storage.byteswap(inplace=True)
  up.fill()
  return obj


def read_torch_file(path_or_file) -> Any:
  """Reads a ``torch.save`` file (zip or legacy format) without torch.

  Tensors of every common dtype (float32/64/16, bfloat16 and the float8 types as
  ``ml_dtypes`` dtypes, int64/32/16/8, uint8/16/32/64, bool, complex64/128) become NumPy
  arrays of their shape, each a copy (views, transposes and tensors sharing a storage
  come out as the tensor they were). Dicts, ``OrderedDict``s (an ``OrderedDict``
  state dict keeps its ``_metadata`` attribute), lists, tuples, sets, Python scalars,
  strings, None and NumPy scalars and arrays are kept.

  Args:
    path_or_file: a path or a binary file object (read from its current position).

  Returns:
    The saved object, with NumPy arrays for tensors.

  Raises:
    pickle.UnpicklingError: the pickle names a global that is not a tensor, container or
      scalar (e.g. a whole pickled ``nn.Module``, or code such as ``os.system``); the
      message names it as ``module.name``. Nothing is called before this check.
    ValueError: the file is neither format, or is truncated or corrupt.
  """
  if isinstance(path_or_file, (str, os.PathLike)):
    with open(path_or_file, "rb") as f:
      data = f.read()
  else:
    data = path_or_file.read()
  buf = io.BytesIO(data)
  try:
    if zipfile.is_zipfile(buf):
      buf.seek(0)
      return _read_zip(buf)
    if data[:2] == b"PK":
      raise ValueError("truncated or corrupt zip archive (a torch.save file cut short?)")
    buf.seek(0)
    return _read_legacy(buf)
  except (EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"truncated or corrupt torch.save file: {e}") from e
  except pickle.UnpicklingError as e:
    if "truncated" in str(e):
      raise ValueError(f"truncated torch.save file: {e}") from e
    raise


#: Where checkpoints nest their state dict, tried in this order.
_NESTING = ("model_state", "state_dict", "model", "model_state_dict")


def _describe(obj):
  if isinstance(obj, Mapping):
    items = [f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:12]]
    more = ", ..." if len(obj) > 12 else ""
    return f"a {type(obj).__name__} {{{', '.join(items)}{more}}}"
  return f"a {type(obj).__name__}"


def load_torch_checkpoint(path_or_file, *, key: str | None = None) -> dict[str, np.ndarray]:
  """A checkpoint's model state dict as a flat ``{name: numpy array}``, without torch.

  Unwraps the nesting the model zoos use: the first of ``model_state`` (OpenPCDet),
  ``state_dict`` (Pointcept, MinkowskiEngine), ``model`` (SPVNAS) and
  ``model_state_dict`` (Open3D-ML) that holds a dict; else the file's top-level dict
  itself (a bare ``torch.save(model.state_dict())``). Of that dict, only the array
  entries are kept (so ``_metadata`` and other non-tensor entries are dropped), in file
  order. Key prefixes such as ``module.`` are kept; see :func:`strip_prefixes`.

  Args:
    path_or_file: a path or a binary file object, zip or legacy format.
    key: the checkpoint entry holding the state dict, instead of the search above.

  Returns:
    ``{name: array}`` with the file's names, dtypes and shapes.

  Raises:
    ValueError: no state dict was found (the message says what the file holds), or the
      file is not a readable ``torch.save`` file.
    pickle.UnpicklingError: the file pickles anything but tensors and containers.
  """
  obj = read_torch_file(path_or_file)
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      raise ValueError(f"no entry {key!r}: the file holds {_describe(obj)}")
    obj = obj[key]
  elif isinstance(obj, Mapping):
    obj = next((obj[k] for k in _NESTING if isinstance(obj.get(k), Mapping)), obj)
  if not isinstance(obj, Mapping) or not any(isinstance(v, np.ndarray) for v in obj.values()):
    raise ValueError(f"no state dict (a dict of tensors) found: the file holds "
                     f"{_describe(obj)}; pass key= to name the entry")
  return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray) and k != "_metadata"}


def strip_prefixes(state_dict: Mapping[str, Any], prefixes=("module.",)) -> dict[str, Any]:
  """Removes leading key prefixes, e.g. ``module.`` (DDP) and then ``backbone.``.

  Each prefix in turn is removed from the start of every key that starts with it; keys
  that do not are kept unchanged. So ``("module.", "backbone.")`` turns
  ``module.backbone.x`` and ``backbone.x`` into ``x`` and ``module.head.y`` into
  ``head.y``, and leaves ``neck.backbone.z`` alone.

  >>> strip_prefixes({"module.backbone.conv.weight": 1, "module.head.bias": 2},
  ...                ("module.", "backbone."))
  {'conv.weight': 1, 'head.bias': 2}

  Args:
    state_dict: ``{name: value}``.
    prefixes: the prefixes, removed in this order.

  Returns:
    A new dict, in the same order, with the same values.

  Raises:
    ValueError: two keys become the same.
  """
  out = dict(state_dict)
  for prefix in prefixes:
    new = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in out.items()}
    if len(new) != len(out):
      raise ValueError(f"stripping {prefix!r} makes keys collide")
    out = new
  return out


def batchnorm_state(params, stats, path, prefix: str) -> dict[str, np.ndarray]:
  """A Flax BatchNorm's parameters (``params``: ``scale``, ``bias``) and its statistics
  (``stats`` walked down ``path``: ``mean``, ``var``) as torch ``BatchNorm1d`` state-dict
  entries under ``prefix`` (``num_batches_tracked`` = 0)."""
  for p in path:
    stats = stats[p]
  return {prefix + ".weight": np.asarray(params["scale"]),
          prefix + ".bias": np.asarray(params["bias"]),
          prefix + ".running_mean": np.asarray(stats["mean"]),
          prefix + ".running_var": np.asarray(stats["var"]),
          prefix + ".num_batches_tracked": np.zeros((), np.int64)}

"""MinkowskiEngine and TorchSparse (SPVNAS) checkpoints for the MinkUNets of
:mod:`jax_sparseconv.models.minkunet`, without torch::

  from jax_sparseconv.models.torch_file import load_torch_checkpoint, strip_prefixes
  from jax_sparseconv.models.minkowski_weights import minkowski_variables, minkowski_config
  sd = strip_prefixes(load_torch_checkpoint("minkunet34c.pth"), ("module.",))
  variables = minkowski_variables(sd)          # checked against MinkUNet(**minkowski_config(sd))
  model = MinkUNet(**minkowski_config(sd))      # or MinkUNet34C(out_channels=20)

Kernel layouts (see ``tests/data/minkunet/LAYOUTS.md``, from MinkowskiEngine 0.5.4
``src/kernel_region.hpp`` and TorchSparse ``nn/utils/kernel.py`` ``get_kernel_offsets``):

* MinkowskiEngine: ``kernel (K^3, Cin, Cout)``, slot ``ix + K*(iy + K*iz)`` (x fastest)
  for every ``K``; a kernel-1 stride-1 conv ``(Cin, Cout)``; a conv bias ``(1, Cout)``;
  ``MinkowskiBatchNorm`` keeps its ``BatchNorm1d`` at ``.bn``.
* TorchSparse (1.4, 2.0 and 2.1 alike): ``kernel (K^3, Cin, Cout)``, x fastest for odd
  ``K^3`` but **z fastest for even** (``K=2``: slot ``iz + K*(iy + K*ix)``); kernel-1
  ``(Cin, Cout)``; bias ``(Cout,)``; ``spnn.BatchNorm`` is a ``BatchNorm1d`` (no ``.bn``).
  The versions differ in their coordinates only (``(x, y, z, b)`` in 1.x, ``(b, x, y, z)``
  in 2.x), not in the weights.
* Here: ``kernel (Kz, Ky, Kx, Cin, Cout)``, slot ``(kz*Ky + ky)*Kx + kx`` (x fastest),
  kernel-1 ``(1, 1, 1, Cin, Cout)``, bias ``(Cout,)``.

Names: a state-dict key's dotted module path becomes the Flax path with each integer
index joined to the name before it (``block1.0.conv1.kernel`` -> ``block1_0/conv1/kernel``,
``up1.1.0.net.0.kernel`` -> ``up1_1_0/net_0/kernel``); BatchNorm ``weight, bias`` are
``params`` ``scale, bias`` and ``running_mean, running_var`` the ``batch_stats``
``mean, var`` (``num_batches_tracked`` dropped); a ``Linear`` (SPVNAS's ``classifier.0``)
is a Dense ``kernel = weight.T``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparseconv.models.torch_file import batchnorm_state

__all__ = ["minkowski_variables", "torchsparse_variables", "minkowski_config",
           "spvnas_config", "to_minkowski_state_dict", "to_torchsparse_state_dict",
           "kernel_from_minkowski", "kernel_to_minkowski", "kernel_from_torchsparse",
           "kernel_to_torchsparse", "TORCHSPARSE_VERSIONS"]

#: Accepted ``version`` values of :func:`torchsparse_variables` (one kernel layout).
TORCHSPARSE_VERSIONS = ("1", "1.4", "2", "2.0", "2.1")

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_BN_BACK = {("params", "scale"): "weight", ("params", "bias"): "bias",
            ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


# --------------------------------------------------------------------------- kernels
def _cube(volume: int, what: str) -> int:
  k = int(round(volume ** (1 / 3)))
  if k ** 3 != volume:
    raise ValueError(f"{what}: {volume} kernel slots is not a cube K^3")
  return k


def kernel_from_minkowski(kernel, what: str = "kernel") -> np.ndarray:
  """MinkowskiEngine ``(K^3, Cin, Cout)`` (x fastest) or kernel-1 ``(Cin, Cout)`` ->
  ours ``(K, K, K, Cin, Cout)`` (a reshape: the slot orders agree)."""
  k = np.asarray(kernel)
  if k.ndim == 2:
    return k.reshape(1, 1, 1, *k.shape)
  if k.ndim != 3:
    raise ValueError(f"{what}: expected (K^3, Cin, Cout) or (Cin, Cout), got {k.shape}")
  K = _cube(k.shape[0], what)
  return k.reshape(K, K, K, *k.shape[1:])


def kernel_to_minkowski(kernel) -> np.ndarray:
  """Ours ``(K, K, K, Cin, Cout)`` -> MinkowskiEngine's (``(Cin, Cout)`` for ``K=1``)."""
  k = np.asarray(kernel)
  if k.shape[:3] == (1, 1, 1):
    return k.reshape(k.shape[3:]).copy()
  return k.reshape(-1, *k.shape[3:]).copy()


def kernel_from_torchsparse(kernel, what: str = "kernel") -> np.ndarray:
  """TorchSparse ``(K^3, Cin, Cout)`` (x fastest for odd ``K^3``, z fastest for even) or
  kernel-1 ``(Cin, Cout)`` -> ours ``(K, K, K, Cin, Cout)`` (``(kz, ky, kx)``)."""
  k = np.asarray(kernel)
  if k.ndim == 2 or (k.ndim == 3 and k.shape[0] % 2 == 1):
    return kernel_from_minkowski(k, what)
  if k.ndim != 3:
    raise ValueError(f"{what}: expected (K^3, Cin, Cout) or (Cin, Cout), got {k.shape}")
  K = _cube(k.shape[0], what)
  return np.ascontiguousarray(k.reshape(K, K, K, *k.shape[1:]).transpose(2, 1, 0, 3, 4))


def kernel_to_torchsparse(kernel) -> np.ndarray:
  """Ours ``(K, K, K, Cin, Cout)`` -> TorchSparse's (the inverse of
  :func:`kernel_from_torchsparse`)."""
  k = np.asarray(kernel)
  if k.shape[:3] == (1, 1, 1) or int(np.prod(k.shape[:3])) % 2 == 1:
    return kernel_to_minkowski(k)
  return np.ascontiguousarray(k.transpose(2, 1, 0, 3, 4)).reshape(-1, *k.shape[3:])


# --------------------------------------------------------------------------- names
def _module_path(prefix: str) -> tuple[str, ...]:
  """``block1.0.conv1`` -> ``("block1_0", "conv1")``: integer indices join the name
  before them."""
  out: list[str] = []
  for part in prefix.split("."):
    if part.isdigit() and out:
      out[-1] += "_" + part
    else:
      out.append(part)
  return tuple(out)


def _torch_prefix(path) -> str:
  """The inverse of :func:`_module_path`."""
  return ".".join(p.replace("_", ".") for p in path)


def _set(tree, path, value, key):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
    if not isinstance(tree, dict):
      raise ValueError(f"{key}: its path {'/'.join(path)} clashes with another entry")
  if path[-1] in tree:
    raise ValueError(f"{key}: two state_dict entries map to {'/'.join(path)}")
  tree[path[-1]] = value


def _convert(state_dict: Mapping[str, Any], flavour: str, drop=()):
  """state_dict -> (variables, {(collection, path): torch key})."""
  sd = {str(k): v for k, v in state_dict.items()}
  variables: dict = {"params": {}, "batch_stats": {}}
  origin: dict = {}
  unknown = []
  kernel_from = kernel_from_minkowski if flavour == "me" else kernel_from_torchsparse
  for key, value in sd.items():
    if any(key.startswith(d) for d in drop):
      continue
    prefix, _, leaf = key.rpartition(".")
    arr = np.asarray(value)
    if leaf == "kernel":
      target = ("params", _module_path(prefix) + ("kernel",))
      arr = kernel_from(arr, key)
    elif leaf == "bias" and prefix + ".kernel" in sd:
      target = ("params", _module_path(prefix) + ("bias",))
      if arr.ndim not in (1, 2) or arr.size != arr.shape[-1]:
        raise ValueError(f"{key}: a conv bias must be (Cout,) or (1, Cout), got {arr.shape}")
      arr = arr.reshape(-1)
    elif prefix + ".running_mean" in sd and leaf in (*_BN_LEAVES, "num_batches_tracked"):
      if leaf == "num_batches_tracked":
        continue
      mod = _module_path(prefix)
      if flavour == "me":
        if mod[-1] != "bn":
          unknown.append(key)  # MinkowskiBatchNorm keeps its BatchNorm1d at ``.bn``
          continue
        mod = mod[:-1]
      col, name = _BN_LEAVES[leaf]
      target = (col, mod + (name,))
    elif flavour == "ts" and leaf in ("weight", "bias") and np.ndim(
        sd.get(prefix + ".weight")) == 2 and prefix + ".running_mean" not in sd:
      target = ("params", _module_path(prefix) + (("kernel",) if leaf == "weight" else
                                                  ("bias",)))
      if leaf == "weight":
        arr = arr.T
    else:
      unknown.append(key)
      continue
    col, path = target
    _set(variables[col], path, jnp.asarray(np.asarray(arr, np.float32)), key)
    origin[(col, path)] = key
  if unknown:
    lib = "MinkowskiEngine" if flavour == "me" else "TorchSparse"
    raise ValueError(f"state_dict entries that are not {lib} MinkUNet parameters (a conv "
                     f"'.kernel'/'.bias', a BatchNorm{' at .bn' if flavour == 'me' else ''}"
                     f"{'' if flavour == 'me' else ', a Linear'}): {unknown[:10]}"
                     f"{' ...' if len(unknown) > 10 else ''}")
  return variables, origin


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = tuple(v.shape) if hasattr(v, "shape") else np.shape(v)
  return out


def _expected(model, in_channels: int):
  """The variable shapes ``model.init`` makes for ``in_channels`` input features."""
  from jax_sparseconv import SparseTensor  # noqa: PLC0415
  n = 8
  t = SparseTensor(feats=jnp.zeros((n, in_channels), jnp.float32),
                   coords=jnp.zeros((n, 3), jnp.int32), valid=jnp.arange(n) < 1, batch=None,
                   voxel_size=jnp.ones((3,), jnp.float32), origin=jnp.zeros((3,), jnp.float32),
                   flags=jnp.zeros((), jnp.int32), maps={})
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), t))
  return {(col,) + p: s for col in ("params", "batch_stats")
          for p, s in _flat(shapes.get(col, {})).items()}


def _torch_name(col, path, flavour, bn_modules=()):
  """The state-dict key of a Flax variable (for messages about missing entries)."""
  *mods, leaf = path
  pre = _torch_prefix(mods)
  if col == "batch_stats" or leaf == "scale" or (leaf == "bias" and tuple(mods) in bn_modules):
    return f"{pre}{'.bn' if flavour == 'me' else ''}.{_BN_BACK[(col, leaf)]}"
  return f"{pre}.{leaf}"


def _check(variables, origin, model, in_channels, flavour):
  want = _expected(model, in_channels)
  have = {(col,) + p: s for col in ("params", "batch_stats")
          for p, s in _flat(variables[col]).items()}
  bn = {k[1:-1] for k in want if k[-1] == "scale"}
  name = lambda k: origin.get((k[0], k[1:])) or _torch_name(k[0], k[1:], flavour, bn)  # noqa
  missing = sorted(name(k) for k in want if k not in have)
  extra = sorted(name(k) for k in have if k not in want)
  bad = [f"{name(k)}: {have[k]} (as {'/'.join(k)}) but the model has {want[k]}"
         for k in want if k in have and have[k] != want[k]]
  msgs = []
  if missing:
    msgs.append(f"missing from the state_dict: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
  if extra:
    msgs.append(f"not in {type(model).__name__}: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
  if bad:
    msgs.append("shape mismatches: " + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else ""))
  if msgs:
    raise ValueError(f"the state_dict does not fit {type(model).__name__}: " + "; ".join(msgs))


# --------------------------------------------------------------------------- configs
def _shape(sd, key):
  if key not in sd:
    raise ValueError(f"the state_dict has no {key!r}: not a MinkUNet checkpoint of this "
                     f"kind (first keys: {list(sd)[:5]})")
  return np.shape(sd[key])


def minkowski_config(state_dict: Mapping[str, Any]) -> dict:
  """The :class:`~jax_sparseconv.models.minkunet.MinkUNet` arguments of a
  MinkowskiEngine MinkUNet state dict: ``out_channels``, ``block``, ``layers``, ``planes``,
  ``init_dim`` (read from the shapes and the block indices). The input channels are
  ``state_dict["conv0p1s1.kernel"].shape[-2]``."""
  sd = {str(k): v for k, v in state_dict.items()}
  block = "bottleneck" if "block1.0.conv3.kernel" in sd else "basic"
  layers, planes = [], []
  for i in range(1, 9):
    n = 0
    while f"block{i}.{n}.conv1.kernel" in sd:
      n += 1
    if n == 0:
      raise ValueError(f"the state_dict has no block{i}.0.conv1.kernel: not a "
                       "MinkowskiEngine MinkUNet")
    layers.append(n)
    planes.append(int(_shape(sd, f"block{i}.0.conv1.kernel")[-1]))
  return dict(out_channels=int(_shape(sd, "final.kernel")[-1]), block=block,
              layers=tuple(layers), planes=tuple(planes),
              init_dim=int(_shape(sd, "conv0p1s1.kernel")[-1]))


def spvnas_config(state_dict: Mapping[str, Any]) -> dict:
  """The :class:`~jax_sparseconv.models.minkunet.SPVNASMinkUNet` arguments of an SPVNAS
  MinkUNet state dict: ``num_classes`` and the 9 ``channels``. The input channels are
  ``state_dict["stem.0.kernel"].shape[-2]`` (4 for SemanticKITTI)."""
  sd = {str(k): v for k, v in state_dict.items()}
  cs = [int(_shape(sd, "stem.0.kernel")[-1])]
  cs += [int(_shape(sd, f"stage{i}.1.net.0.kernel")[-1]) for i in range(1, 5)]
  cs += [int(_shape(sd, f"up{i}.0.net.0.kernel")[-1]) for i in range(1, 5)]
  return dict(num_classes=int(_shape(sd, "classifier.0.weight")[0]), channels=tuple(cs))


# --------------------------------------------------------------------------- loaders
def minkowski_variables(state_dict: Mapping[str, Any], model=None) -> dict[str, dict]:
  """Flax variables of a MinkowskiEngine MinkUNet state dict (``MinkUNet14/18/34/50/101``
  and their A-D variants, any width), e.g. from
  :func:`~jax_sparseconv.models.torch_file.load_torch_checkpoint`.

  Every ``kernel`` becomes ``(K, K, K, Cin, Cout)`` (:func:`kernel_from_minkowski`), a
  conv bias ``(Cout,)``; ``*.bn.{weight, bias}`` the BatchNorm ``scale, bias`` and
  ``*.bn.running_{mean, var}`` its ``batch_stats``.

  Args:
    state_dict: ``{name: array}`` with ME's names (strip a ``module.`` prefix first:
      :func:`~jax_sparseconv.models.torch_file.strip_prefixes`).
    model: the :class:`MinkUNet` to check against; default
      ``MinkUNet(**minkowski_config(state_dict))``.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` for ``model.apply``.

  Raises:
    ValueError: entries that are no MinkUNet parameter, entries the model lacks or
      misses, or shapes that differ (the message names the state-dict keys).
  """
  from jax_sparseconv.models.minkunet import MinkUNet  # noqa: PLC0415
  variables, origin = _convert(state_dict, "me")
  sd = {str(k): v for k, v in state_dict.items()}
  if model is None:
    model = MinkUNet(**minkowski_config(sd))
  _check(variables, origin, model, int(_shape(sd, "conv0p1s1.kernel")[-2]), "me")
  return variables


def torchsparse_variables(state_dict: Mapping[str, Any], version: str = "2", model=None,
                          *, drop=("point_transforms.",)) -> dict[str, dict]:
  """Flax variables of SPVNAS's TorchSparse MinkUNet state dict (the ``"model"`` entry of
  SPVNAS's checkpoints; :func:`load_torch_checkpoint` unwraps it).

  Every ``kernel`` becomes ``(K, K, K, Cin, Cout)`` (:func:`kernel_from_torchsparse`: the
  ``K=2`` kernels are z fastest in TorchSparse); BatchNorm ``weight, bias, running_*`` as
  in :func:`minkowski_variables` (no ``.bn``); ``classifier.0`` (a ``Linear``) a Dense
  kernel ``weight.T``. SPVNAS's ``point_transforms.*`` (unused by the voxel MinkUNet's
  forward) are dropped (``drop``).

  Args:
    state_dict: ``{name: array}`` with SPVNAS's names.
    version: the TorchSparse version that wrote it, one of :data:`TORCHSPARSE_VERSIONS`.
      1.4, 2.0 and 2.1 share this kernel layout (they differ in coordinates:
      ``(x, y, z, b)`` in 1.x, ``(b, x, y, z)`` in 2.x), so it is only checked.
    model: the :class:`SPVNASMinkUNet` to check against; default
      ``SPVNASMinkUNet(**spvnas_config(state_dict))``.
    drop: key prefixes ignored.

  Returns / Raises: as :func:`minkowski_variables`.
  """
  from jax_sparseconv.models.minkunet import SPVNASMinkUNet  # noqa: PLC0415
  if str(version) not in TORCHSPARSE_VERSIONS:
    raise ValueError(f"version must be one of {TORCHSPARSE_VERSIONS}, got {version!r}")
  variables, origin = _convert(state_dict, "ts", drop=tuple(drop))
  sd = {str(k): v for k, v in state_dict.items()}
  if model is None:
    model = SPVNASMinkUNet(**spvnas_config(sd))
  _check(variables, origin, model, int(_shape(sd, "stem.0.kernel")[-2]), "ts")
  return variables


def _to_state_dict(variables, flavour):
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  out: dict[str, np.ndarray] = {}

  def walk(tree, path):
    if "kernel" in tree and np.ndim(tree["kernel"]) == 5:
      pre = _torch_prefix(path)
      to = kernel_to_minkowski if flavour == "me" else kernel_to_torchsparse
      out[pre + ".kernel"] = to(np.asarray(tree["kernel"]))
      if "bias" in tree:
        b = np.asarray(tree["bias"])
        out[pre + ".bias"] = b.reshape(1, -1) if flavour == "me" else b.copy()
    elif "kernel" in tree and np.ndim(tree["kernel"]) == 2:
      pre = _torch_prefix(path)
      out[pre + ".weight"] = np.asarray(tree["kernel"]).T.copy()
      if "bias" in tree:
        out[pre + ".bias"] = np.asarray(tree["bias"])
    elif "scale" in tree:
      out.update(batchnorm_state(tree, stats, path,
                                 _torch_prefix(path) + (".bn" if flavour == "me" else "")))
    else:
      for name in tree:
        walk(tree[name], path + (name,))

  walk(params, ())
  return out


def to_minkowski_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of :func:`minkowski_variables`: a MinkowskiEngine state dict (NumPy;
  ``num_batches_tracked`` 0), e.g. for ``model.load_state_dict({k: torch.from_numpy(v)
  ...})`` in MinkowskiEngine."""
  return _to_state_dict(variables, "me")


def to_torchsparse_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of :func:`torchsparse_variables` (without ``point_transforms``)."""
  return _to_state_dict(variables, "ts")

"""spconv-based zoo checkpoints (OpenPCDet, Pointcept) <-> Flax variables.

The Flax models of :mod:`~jax_sparseconv.models.openpcdet` and
:mod:`~jax_sparseconv.models.pointcept` name their layers after the torch modules
(``conv2.0.0``, ``enc.1.block0.conv1``, ...), so a state-dict key ``<module>.<leaf>`` maps
to the variable ``<module>/<name>``:

* a conv's ``weight`` -> ``params/<module>/kernel`` in this library's index-order layout
  ``(k0, k1, k2, Cin, Cout)`` (the spconv layers of :mod:`jax_sparseconv.linen`), from
  the file's layout, which shapes cannot tell apart when ``Cin == Cout``, so it is given:

  ===========  =============================  ==========================================
  version      spconv weight                  kernel
  ===========  =============================  ==========================================
  ``"1"``      ``(k0, k1, k2, Cin, Cout)``    unchanged (OpenPCDet's zoo files)
  ``"2.1"``    ``(k0, k1, k2, Cout, Cin)``    ``transpose(0, 1, 2, 4, 3)`` (2.0 - 2.1)
  ``"2"``      ``(Cout, k0, k1, k2, Cin)``    ``transpose(1, 2, 3, 4, 0)`` (>= 2.2)
  ===========  =============================  ==========================================

  spconv 2.x computes a kernel-1 conv as ``x @ weight.reshape(Cin, Cout)`` (the memory
  reinterpreted, not transposed: traveller59/spconv#450), and weights trained with it
  depend on that (Pointcept's ``proj`` and ``final``); for versions ``"2"`` and ``"2.1"``
  kernel-1 weights are therefore read as ``weight.reshape(1, 1, 1, Cin, Cout)``.
* a conv's ``bias`` -> ``params/<module>/bias``;
* BatchNorm ``weight``/``bias`` -> ``params/<module>/scale``/``bias``, ``running_mean``/
  ``running_var`` -> ``batch_stats/<module>/mean``/``var``; ``num_batches_tracked`` is
  dropped.

:func:`to_spconv_state_dict` goes back (spconv 2.x layout by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jax_sparseconv.models.torch_file import strip_prefixes

__all__ = ["openpcdet_variables", "pointcept_variables", "spconv_variables",
           "to_spconv_state_dict", "spconv_kernel", "SPCONV_VERSIONS"]

SPCONV_VERSIONS = ("1", "2.1", "2")
_BN = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def spconv_kernel(weight, spconv_version: str, *, key: str = "weight") -> np.ndarray:
  """A spconv conv weight as this library's ``(k0, k1, k2, Cin, Cout)`` kernel (see the
  module docstring; ``key`` names the entry in errors)."""
  if spconv_version not in SPCONV_VERSIONS:
    raise ValueError(f"spconv_version must be one of {SPCONV_VERSIONS} (the layout cannot be "
                     f"inferred from the shapes), got {spconv_version!r}")
  w = np.asarray(weight)
  if w.ndim != 5:
    raise ValueError(f"{key}: a spconv conv weight has 5 dimensions, got shape {w.shape}")
  if spconv_version == "1":
    k = w
  elif spconv_version == "2.1":
    k = w.transpose(0, 1, 2, 4, 3)
  else:
    k = w.transpose(1, 2, 3, 4, 0)
  if spconv_version != "1" and k.shape[:3] == (1, 1, 1):  # spconv#450: x @ w.view(Cin, Cout)
    k = np.ascontiguousarray(w).reshape(1, 1, 1, k.shape[3], k.shape[4])
  return k


def spconv_variables(state_dict: Mapping[str, Any], spconv_version: str = "2",
                     *, prefix: str = "") -> dict[str, dict]:
  """Flax variables from a spconv model's state dict: the keys under ``prefix`` (others
  are skipped), mapped as the module docstring says.

  Raises:
    ValueError: an entry under ``prefix`` that fits no rule (the message names it), or a
      conv weight that is not 5-D.
  """
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not sd:
    some = list(state_dict)[:5]
    raise ValueError(f"no state-dict entries start with {prefix!r} (first keys: {some})")
  bn_modules = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".running_mean")}
  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  unknown = []
  for key, value in sd.items():
    module, _, leaf = key.rpartition(".")
    arr = np.asarray(value)
    if leaf == "num_batches_tracked":
      continue
    if module in bn_modules and leaf in ("weight", "bias", "running_mean", "running_var"):
      col, name = _BN.get(leaf, ("params", "scale" if leaf == "weight" else "bias"))
      out = arr.astype(np.float32)
    elif leaf == "weight" and arr.ndim == 5:
      col, name = "params", "kernel"
      out = spconv_kernel(arr, spconv_version, key=prefix + key).astype(np.float32)
    elif leaf == "bias" and arr.ndim == 1:
      col, name = "params", "bias"
      out = arr.astype(np.float32)
    else:
      unknown.append(f"{prefix}{key} {arr.shape}")
      continue
    variables[col].setdefault(module, {})[name] = jnp.asarray(out)
  if unknown:
    raise ValueError(f"state-dict entries that are neither spconv convs nor BatchNorm: "
                     f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
  if not variables["batch_stats"]:
    del variables["batch_stats"]
  return variables


def openpcdet_variables(ckpt: Mapping[str, Any], spconv_version: str = "1",
                        *, prefix: str = "backbone_3d.") -> dict[str, dict]:
  """Variables of :class:`~jax_sparseconv.models.VoxelBackBone8x` /
  :class:`~jax_sparseconv.models.VoxelResBackBone8x` from an OpenPCDet checkpoint.

  Args:
    ckpt: :func:`~jax_sparseconv.models.load_torch_checkpoint`'s result (the
      ``model_state`` of a whole-detector file), or the raw file dict with
      ``'model_state'``, or a bare state dict. The keys under ``prefix`` are the
      backbone's; the rest (``vfe``, ``dense_head.*``, ``global_step``, ...) are skipped.
    spconv_version: the layout of the weights (``"1"``: OpenPCDet's model-zoo files, trained
      with spconv 1.x; ``"2"``: files trained with spconv >= 2.2; ``"2.1"``).
    prefix: the backbone's key prefix (``module.`` is stripped first).

  >>> import numpy as np
  >>> sd = {"backbone_3d.conv_input.0.weight": np.zeros((3, 3, 3, 4, 16), np.float32),
  ...       "dense_head.conv_cls.weight": np.zeros((2, 4, 1, 1), np.float32)}
  >>> openpcdet_variables(sd, "1")["params"]["conv_input.0"]["kernel"].shape
  (3, 3, 3, 4, 16)
  """
  sd = ckpt.get("model_state", ckpt) if isinstance(ckpt, Mapping) else ckpt
  sd = {k: v for k, v in sd.items() if isinstance(v, np.ndarray) or hasattr(v, "shape")}
  return spconv_variables(strip_prefixes(sd, ("module.",)), spconv_version, prefix=prefix)


def pointcept_variables(ckpt: Mapping[str, Any], spconv_version: str = "2") -> dict[str, dict]:
  """Variables of :class:`~jax_sparseconv.models.SpUNet` from a Pointcept checkpoint
  (``load_torch_checkpoint``'s result, the file dict with ``'state_dict'``, or a bare
  state dict); the ``module.`` (DDP) and then ``backbone.`` (segmentor) prefixes are
  stripped and the segmentor's other entries (e.g. ``criteria``) skipped. Pointcept trains
  with spconv 2.x: version ``"2"``, kernel-1 weights read as spconv computes them."""
  sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
  sd = {k: v for k, v in sd.items() if isinstance(v, np.ndarray) or hasattr(v, "shape")}
  sd = strip_prefixes(sd, ("module.", "backbone."))
  ours = ("conv_input.", "down.", "up.", "enc.", "dec.", "final.")
  return spconv_variables({k: v for k, v in sd.items() if k.startswith(ours)}, spconv_version)


def to_spconv_state_dict(variables: Mapping[str, Any], spconv_version: str = "2", *,
                         prefix: str = "") -> dict[str, np.ndarray]:
  """The way back: a torch state dict (NumPy arrays, ``prefix`` + module keys) from
  these models' variables, in the given spconv layout (kernel-1 weights as spconv 2.x
  reads them); load it with ``model.load_state_dict({k: torch.from_numpy(v) ...},
  strict=False)`` (``num_batches_tracked`` is not restored)."""
  out = {}
  stats = variables.get("batch_stats", {})
  for module, leaves in variables["params"].items():
    if "scale" in leaves:
      out[f"{prefix}{module}.weight"] = np.asarray(leaves["scale"])
      out[f"{prefix}{module}.bias"] = np.asarray(leaves["bias"])
      out[f"{prefix}{module}.running_mean"] = np.asarray(stats[module]["mean"])
      out[f"{prefix}{module}.running_var"] = np.asarray(stats[module]["var"])
      continue
    k = np.asarray(leaves["kernel"])
    if spconv_version == "1":
      w = k
    elif k.shape[:3] == (1, 1, 1):
      w = k.reshape((k.shape[4], 1, 1, 1, k.shape[3]) if spconv_version == "2"
                    else (1, 1, 1, k.shape[4], k.shape[3]))
    elif spconv_version == "2.1":
      w = k.transpose(0, 1, 2, 4, 3)
    else:
      w = k.transpose(4, 0, 1, 2, 3)
    out[f"{prefix}{module}.weight"] = np.ascontiguousarray(w)
    if "bias" in leaves:
      out[f"{prefix}{module}.bias"] = np.asarray(leaves["bias"])
  return out

"""Bad input gets a clear ValueError/TypeError naming the argument and shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc

POS = np.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [1.5, 1.5, 0.5]], np.float32)
FEATS = np.ones((3, 2), np.float32)
PARAMS = {"kernel": np.ones((3, 3, 3, 2, 4), np.float32), "bias": np.zeros(4, np.float32)}


def conv(**kw):
  args = dict(params=PARAMS, feats=FEATS, in_pos=POS, out_pos=POS, voxel_size=1.0)
  args.update(kw)
  return sc.sparse_conv(**args)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(feats=np.ones((3,), np.float32)), ValueError, "feats must have rank 2"),
    (dict(feats=np.ones((4, 2), np.float32)), ValueError, r"feats has 4 rows but in_pos has 3"),
    (dict(feats=np.ones((3, 2), np.int32)), TypeError, "feats must be a floating-point"),
    (dict(feats=np.ones((3, 5), np.float32)), ValueError, r"5 channels .* expects Cin=2"),
    (dict(in_pos=POS[:, :2]), ValueError, r"in_pos must have shape \(num_points, 3\)"),
    (dict(out_pos=POS[None]), ValueError, "out_pos must have rank 2"),
    (dict(in_pos=POS.astype(np.int32)), TypeError, "in_pos must be a floating-point"),
    (dict(voxel_size=np.array([1.0, 1.0])), ValueError, "voxel_size must be a scalar"),
    (dict(voxel_size=0.0), ValueError, "voxel_size must be positive"),
    (dict(voxel_size=-0.5), ValueError, "voxel_size must be positive"),
    (dict(voxel_size="1"), TypeError, "voxel_size must be a real scalar"),
    (dict(params={"kernel": np.ones((3, 3, 2, 4))}), ValueError, r"params\['kernel'\] must have rank 5"),
    (dict(params={"kernel": PARAMS["kernel"], "bias": np.ones(3)}), ValueError, r"bias.*\(4,\)"),
    (dict(params={"weights": PARAMS["kernel"]}), TypeError, "'kernel' entry"),
    (dict(params={**PARAMS, "extra": 1}), ValueError, "unknown entries"),
    (dict(inp_importance=np.ones(2, np.float32)), ValueError, r"inp_importance must have shape \(3,\)"),
    (dict(offset=[0.0, 0.0]), ValueError, r"offset must have shape \(3,\)"),
    (dict(in_pos=np.where(np.arange(3)[:, None] == 1, np.nan, POS)), ValueError, "NaN"),
    (dict(in_pos=POS + np.float32(np.inf)), ValueError, "NaN or infinite"),
    (dict(kernel_map="map"), TypeError, "kernel_map must be a KernelMap"),
])
def test_bad_arguments(kw, exc, match):
  with pytest.raises(exc, match=match):
    conv(**kw)


def test_kernel_map_mismatches():
  km2 = sc.build_kernel_map(POS, POS, 1.0, 2)
  with pytest.raises(ValueError, match="kernel_size"):
    conv(kernel_map=km2)
  kmt = sc.build_kernel_map(POS, POS, 1.0, 3, transpose=True)
  with pytest.raises(ValueError, match="transpose=False"):
    conv(kernel_map=kmt)
  km = sc.build_kernel_map(POS, POS[:2], 1.0, 3)
  with pytest.raises(ValueError, match="outputs"):
    conv(kernel_map=km)
  with pytest.raises(ValueError, match="differs"):
    conv(kernel_map=sc.build_kernel_map(POS, POS, 1.0, 3), offset=[0.5, 0, 0])


def test_build_kernel_map_arguments():
  with pytest.raises(ValueError, match="kernel_size"):
    sc.build_kernel_map(POS, POS, 1.0, (3, 3))
  with pytest.raises(ValueError, match=">= 1"):
    sc.build_kernel_map(POS, POS, 1.0, 0)
  with pytest.raises(ValueError, match="both in_batch and out_batch"):
    sc.build_kernel_map(POS, POS, 1.0, 3, in_batch=np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="in_valid must be"):
    sc.build_kernel_map(POS, POS, 1.0, 3, in_valid=np.ones(2, bool))
  with pytest.raises(ValueError, match="offset must be static"):
    jax.jit(lambda o: sc.build_kernel_map(POS, POS, 1.0, 3, offset=o))(jnp.zeros(3))
  with pytest.raises(ValueError, match="negative"):
    sc.build_kernel_map(POS, POS, 1.0, 3, in_batch=np.array([0, -1, 0]),
                        out_batch=np.zeros(3, np.int32))


def test_traced_bad_voxel_size_raises_or_gives_nan(flag_errors):
  y = jax.jit(lambda vs: conv(voxel_size=vs))(jnp.float32(-1.0))
  assert np.all(np.isnan(y))
  sc.set_error_mode("raise")
  with pytest.raises(Exception, match="voxel_size is not positive"):
    jax.jit(lambda vs: conv(voxel_size=vs))(jnp.float32(-1.0))
  y = jax.jit(lambda vs: conv(voxel_size=vs))(jnp.float32(1.0))
  assert np.all(np.isfinite(y))

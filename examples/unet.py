"""A small sparse U-Net in Flax, trained for a few steps on a synthetic scan (README example)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_sparseconv as sc
from jax_sparseconv.linen import DownConv, SubMConv, UpConv


class UNet(nn.Module):
  num_classes: int = 2

  @nn.compact
  def __call__(self, fine: sc.SparseTensor, coarse: sc.SparseTensor):
    x = SubMConv(16, activation=nn.relu)(fine)          # submanifold K=3
    x = SubMConv(16, activation=nn.relu)(x)
    c = DownConv(32, activation=nn.relu)(x, coarse)     # strided K=2 (stride 2)
    c = SubMConv(32, activation=nn.relu)(c)             # coarse level
    u = UpConv(16, activation=nn.relu)(c, x)            # transposed K=2, back to fine
    x = x.replace(feats=jnp.concatenate([x.feats, u.feats], axis=-1))  # skip connection
    return SubMConv(self.num_classes, kernel_size=1)(x).feats          # per-voxel logits


def levels(points, feats, voxel_size=0.05):
  """Voxelise, then build every kernel map once: the fine level's, the coarse level's,
  the down map and (its transpose, no search) the up map."""
  fine = sc.SparseTensor.from_points(points, feats, voxel_size)
  fine = fine.with_kernel_map(3).with_kernel_map(1)
  return fine, fine.down().with_kernel_map(3)


rng = np.random.default_rng(0)
xy = rng.uniform(0, 2, (4000, 2))
height = np.where(np.hypot(*(xy - 1).T) < 0.5, 0.3, 0.0)  # a raised disc on a floor
points = np.c_[xy, height + rng.normal(0, 0.01, 4000)].astype(np.float32)
feats = np.c_[points[:, 2:], np.ones((4000, 1))].astype(np.float32)  # per-point inputs
fine, coarse = jax.jit(levels)(points, feats)
labels = (fine.positions[:, 2] > 0.15).astype(jnp.int32)  # per voxel (padding rows: NaN -> 0)

model = UNet()
params = model.init(jax.random.key(0), fine, coarse)
opt = optax.adam(1e-2)
opt_state = opt.init(params)


@jax.jit
def train_step(params, opt_state, fine, coarse, labels):
  def loss_fn(params):
    logits = model.apply(params, fine, coarse)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(jnp.where(fine.valid, ce, 0)) / fine.count  # padding rows excluded
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = opt.update(grads, opt_state)
  return optax.apply_updates(params, updates), opt_state, loss


for step in range(30):
  params, opt_state, loss = train_step(params, opt_state, fine, coarse, labels)
pred = jnp.argmax(model.apply(params, fine, coarse), axis=-1)
accuracy = jnp.sum((pred == labels) & fine.valid) / fine.count
print(f"{int(fine.count)} voxels, {int(coarse.count)} coarse; loss {float(loss):.3f}, "
      f"accuracy {float(accuracy):.3f}")

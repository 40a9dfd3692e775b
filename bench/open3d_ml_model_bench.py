"""Times Open3D-ML's own ``SparseConvUnet`` (torch, CPU) on a 2-cloud batch.

Runs in the Open3D environment (Python 3.11, open3d-cpu 0.20 + torch + Open3D-ML's extras;
see REFERENCE-unet.md), not in the JAX one; ``bench/model_bench.py`` calls it:

    /work/o3d-venv/bin/python bench/open3d_ml_model_bench.py --data tests/data/unet/plain.npz \
        --out /tmp/o3d_model.npz

Reads the pre-processed clouds ``points_b*`` / ``feats_b*`` of the .npz, builds
``SparseConvUnet(multiplier=..., device='cpu')`` with seeded random weights (BatchNorm
statistics included), and times, with ``torch.set_num_threads(threads)``:

* forward: ``model(batch)`` in ``eval()`` under ``torch.no_grad()``;
* train step: ``model.train()``, ``model(batch)``, cross-entropy against seeded random
  labels, ``loss.backward()`` (gradients zeroed before each step; BatchNorm running
  statistics advance as in training).

Prints one JSON line (medians in ms, all runs' wall and process CPU times, versions) and
writes the state_dict, the labels, the eval logits, and the logits and BatchNorm running
statistics after one train-mode forward to ``--out``, so that the JAX side can check that it
computes the same.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch

import open3d
from open3d.ml.torch.dataloaders import ConcatBatcher
from open3d.ml.torch.models import SparseConvUnet


def random_weights(model, seed):
  rng = np.random.default_rng(seed)
  new = {}
  for k, v in model.state_dict().items():
    if k.endswith(".net.offset") or k.endswith("num_batches_tracked"):
      new[k] = v.clone()
      continue
    shape = tuple(v.shape)
    if k.endswith(".net.kernel"):
      a = 1.7 / np.sqrt(shape[0] ** 3 * shape[3])
      w = rng.uniform(-a, a, shape)
    elif ".bn." in k:
      lo, hi = {"weight": (0.5, 1.5), "bias": (-0.2, 0.2), "running_mean": (-0.3, 0.3),
                "running_var": (0.5, 2.0)}[k.rsplit(".", 1)[1]]
      w = rng.uniform(lo, hi, shape)
    else:
      w = rng.uniform(-0.3, 0.3, shape)
    new[k] = torch.from_numpy(w.astype(np.float32))
  model.load_state_dict(new)


def make_batch(model, clouds):
  batcher = ConcatBatcher("cpu", model=model.cfg.name)
  items = []
  for pts, feat in clouds:
    data = {"point": pts.copy(), "feat": feat.copy(), "label": np.zeros(len(pts), np.int32)}
    items.append({"data": model.transform(data, {}), "attr": {}})
  return batcher.collate_fn(items)["data"]


def timed(fn, repeats, warmup):
  """Wall-clock and process CPU times (ms) of ``repeats`` calls after ``warmup``."""
  for _ in range(warmup):
    fn()
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall.append((time.perf_counter() - t) * 1e3)
    cpu.append((time.process_time() - c) * 1e3)
  return wall, cpu


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", required=True, help=".npz with points_b0/feats_b0/points_b1/...")
  ap.add_argument("--out", default=None, help="where to write state_dict, labels, logits")
  ap.add_argument("--multiplier", type=int, default=16)
  ap.add_argument("--conv-block-reps", type=int, default=1)
  ap.add_argument("--residual", action="store_true")
  ap.add_argument("--num-classes", type=int, default=20)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)

  torch.set_num_threads(args.threads)
  d = np.load(args.data)
  nb = sum(1 for k in d.files if k.startswith("points_b"))
  clouds = [(d[f"points_b{b}"], d[f"feats_b{b}"]) for b in range(nb)]
  model = SparseConvUnet(multiplier=args.multiplier, conv_block_reps=args.conv_block_reps,
                         residual_blocks=args.residual, num_classes=args.num_classes,
                         device="cpu")
  random_weights(model, args.seed)
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  batch = make_batch(model, clouds)
  n = sum(len(c[0]) for c in clouds)
  labels = torch.from_numpy(np.random.default_rng(args.seed + 1).integers(
      0, args.num_classes, n).astype(np.int64))

  model.eval()
  with torch.no_grad():
    logits = model(batch).numpy().copy()

    def forward():
      model(batch)

    fwd, fwd_cpu = timed(forward, args.repeats, args.warmup)

  # One train-mode forward (batch statistics over both clouds, running averages updated),
  # saved for the JAX side to check; then the weights are restored for the timings.
  model.train()
  with torch.no_grad():
    train_logits = model(batch).numpy().copy()
  after = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
           if k.endswith("running_mean") or k.endswith("running_var")}
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  loss_fn = torch.nn.CrossEntropyLoss()

  def train_step():
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(batch), labels)
    loss.backward()

  step, step_cpu = timed(train_step, args.repeats, args.warmup)

  if args.out:
    np.savez(args.out, logits=logits, labels=labels.numpy(), train_logits=train_logits,
             **{"sd/" + k: v for k, v in state.items()},
             **{"after/" + k: v for k, v in after.items()})
  voxels = [int(model.input_layer(torch.from_numpy(f), torch.from_numpy(p))[1].shape[0])
            for p, f in clouds]
  print(json.dumps({
      "forward_ms": float(np.median(fwd)), "forward_runs_ms": fwd, "forward_cpu_ms": fwd_cpu,
      "train_step_ms": float(np.median(step)), "train_step_runs_ms": step,
      "train_step_cpu_ms": step_cpu,
      "points": [len(c[0]) for c in clouds], "level0_voxels": voxels,
      "threads": torch.get_num_threads(), "torch": torch.__version__,
      "open3d": open3d.__version__, "python": sys.version.split()[0],
  }))


if __name__ == "__main__":
  main()

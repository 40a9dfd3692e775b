"""Trains a MinkUNet for LiDAR semantic segmentation on a SemanticKITTI-format folder.

    python examples/semantic_kitti.py                       # a small generated set, ~minutes on CPU
    python examples/semantic_kitti.py --data /data/semantic_kitti/dataset --steps 20000 \\
        --width 1.0 --voxel-size 0.05 --range 51.2 --batch-size 2
    python examples/semantic_kitti.py --eval runs/semantic_kitti/checkpoint.npz

``--data`` is the folder holding ``sequences/XX/velodyne/*.bin`` and ``labels/*.label``
(read by :class:`jax_sparseconv.datasets.SemanticKITTI`: train on the ``train`` split
00-07, 09, 10, evaluate on ``valid`` 08; sequences absent from the folder are skipped).
Without ``--data`` a small synthetic set in that exact format is written first
(:func:`jax_sparseconv.datasets.synthetic.write_semantic_kitti`: the simulated LiDAR's
street scenes, sequence 00 for training and 08 held out).

The network is SPVNAS's SemanticKITTI MinkUNet (``--model spvnas``, channel ratio
``--width``) or one of MinkowskiEngine's (``--model minkunet34c`` ...), on the inputs
SPVNAS uses: per point ``(x, y, z, remission)``, voxelised on the device with
MinkowskiEngine's ``TensorField`` rule (mean features per voxel); the per-voxel logits
are sliced back to the points, the loss is the points' cross entropy over the 19
classes (``unlabeled`` ignored), and the metric SemanticKITTI's: per-class IoU over the
points of the held-out scans and their mean over the 19 classes (the official
``semantic-kitti-api`` mean, absent classes counting 0) and over the classes present.

Batches come from :class:`jax_sparseconv.datasets.Pipeline` (crop to ``--range``,
random rotation / flips / scale, packed ``--batch-size`` scans per step), a pure function
of ``(seed, step)``: a checkpoint (``<workdir>/checkpoint.npz``, every ``--ckpt-every``
steps and at the end: parameters, BatchNorm statistics, optimiser state, step, history,
configuration) is all it takes to resume, which happens by default when ``--workdir``
holds one (``--fresh`` starts over). ``<workdir>/training.png`` plots the loss, the
held-out mIoU and the per-class IoU; ``<workdir>/metrics.json`` holds the numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jax_sparseconv import datasets as D  # noqa: E402
from jax_sparseconv.datasets import semantic_kitti as SK  # noqa: E402
from jax_sparseconv.models import minkunet as M  # noqa: E402

NUM_CLASSES = len(SK.CLASS_NAMES)  # 19
CONFIG_KEYS = ("model", "width", "voxel_size", "range", "seed")


# --------------------------------------------------------------------------- arguments
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", type=pathlib.Path, default=None,
                 help="SemanticKITTI folder (holding sequences/); default: generate a small "
                      "synthetic one in <workdir>/data")
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("runs/semantic_kitti"),
                 help="checkpoint, plot and metrics go here (default %(default)s)")
  p.add_argument("--eval", type=pathlib.Path, default=None, metavar="CHECKPOINT",
                 help="only evaluate this checkpoint on the valid split")
  p.add_argument("--model", default="spvnas",
                 help="spvnas (SPVNAS's SemanticKITTI MinkUNet) or a MinkowskiEngine variant: "
                      + ", ".join(n.lower() for n in M.ME_MODELS) + " (default %(default)s)")
  p.add_argument("--width", type=float, default=0.25,
                 help="channel ratio (SPVNAS's cr; MinkowskiEngine: planes multiplier); "
                      "1.0 is the published network (default %(default)s)")
  p.add_argument("--voxel-size", type=float, default=0.2,
                 help="metres (SPVNAS: 0.05; default %(default)s)")
  p.add_argument("--range", type=float, default=24.0,
                 help="keep points with |x|, |y| below this (metres), z in [-4, 4] "
                      "(default %(default)s; SemanticKITTI models use 51.2)")
  p.add_argument("--steps", type=int, default=120, help="training steps (default %(default)s)")
  p.add_argument("--batch-size", type=int, default=2, help="scans per step (default %(default)s)")
  p.add_argument("--lr", type=float, default=4e-3, help="Adam learning rate (default %(default)s)")
  p.add_argument("--point-capacity", type=int, default=None,
                 help="points per packed batch (default: from the first scans, with margin)")
  p.add_argument("--voxel-capacity", type=int, default=None,
                 help="voxels per packed batch (default: from the first scans, with margin)")
  p.add_argument("--eval-every", type=int, default=40,
                 help="evaluate every this many steps (default %(default)s; 0: at the end)")
  p.add_argument("--ckpt-every", type=int, default=40,
                 help="checkpoint every this many steps (default %(default)s)")
  p.add_argument("--max-eval-scans", type=int, default=None,
                 help="evaluate on at most this many held-out scans")
  p.add_argument("--train-scans", type=int, default=8,
                 help="generated data: training scans (default %(default)s)")
  p.add_argument("--val-scans", type=int, default=2,
                 help="generated data: held-out scans (default %(default)s)")
  p.add_argument("--az-steps", type=int, default=256,
                 help="generated data: LiDAR azimuth steps per turn, a multiple of 128 "
                      "(default %(default)s)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
  p.add_argument("--keep-checkpoints", action="store_true",
                 help="also keep every checkpoint as checkpoint_<step>.npz")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--log-every", type=int, default=10,
                 help="without a terminal: a progress line every this many steps")
  return p.parse_args(argv)


# --------------------------------------------------------------------------- model
def build_model(model: str, width: float):
  """The network for a ``--model`` value."""
  name = model.lower()
  if name == "spvnas":
    return M.SPVNASMinkUNet(num_classes=NUM_CLASSES, cr=width)
  by_lower = {n.lower(): c for n, c in M.ME_MODELS.items()}
  if name not in by_lower:
    raise SystemExit(f"--model {model!r}: use spvnas or one of {sorted(by_lower)}")
  return by_lower[name](out_channels=NUM_CLASSES, width=width)


def point_cloud_range(r: float):
  return (-r, -r, -4.0, r, r, 4.0)


def make_example(cloud, rng, *, r, augmentation):
  """Crop and augment one scan; features (x, y, z, remission), labels 1..19 (0 ignored)."""
  ex = D.point_example(cloud, rng, feat_keys=("strength",), label_key="label",
                       point_cloud_range=point_cloud_range(r), augmentation=augmentation)
  ex["feats"] = np.concatenate([ex["coord"], ex["feats"]], 1).astype(np.float32)
  ex.pop("name", None)
  return ex


AUGMENTATION = dict(rotation=np.pi, flip_x=0.5, flip_y=0.5, scale=(0.95, 1.05), jitter=0.0)


def estimate_capacities(source, r, voxel_size, batch_size, n=8):
  """Points and voxels per packed batch from the first scans: the largest, x1.3, times the
  batch size, rounded up to 256 (the same static shapes for every step)."""
  pts, vox = 1, 1
  for i in range(min(n, len(source))):
    ex = make_example(source[i], None, r=r, augmentation=None)
    pts = max(pts, len(ex["coord"]))
    vox = max(vox, len(np.unique(np.floor(ex["coord"] / np.float32(voxel_size)), axis=0)))
  up = lambda v: int(-(-int(1.3 * v * batch_size) // 256) * 256)  # noqa: E731
  return up(pts), up(vox)


def count_voxels(batch, voxel_size):
  m = batch["valid"]
  c = np.floor(batch["coord"][m] / np.float32(voxel_size)).astype(np.int64)
  return len(np.unique(np.c_[batch["batch"][m], c], axis=0))


# --------------------------------------------------------------------------- steps
def make_steps(model, voxel_size, voxel_capacity, tx):
  """The jitted train and predict steps."""

  def forward(variables, b, train):
    feats = jnp.where(b["valid"][:, None], b["feats"], 0)
    coord = jnp.where(b["valid"][:, None], b["coord"], 0)
    x, p2v = M.tensor_field_quantize(coord, feats, voxel_size, batch=b["batch"],
                                     valid=b["valid"], capacity=voxel_capacity)
    if train:
      out, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return M.slice_points(out, p2v), upd["batch_stats"]
    return M.slice_points(model.apply(variables, x), p2v), None

  def loss_fn(params, batch_stats, b):
    logits, stats = forward({"params": params, "batch_stats": batch_stats}, b, True)
    lab = b["labels"] - 1                       # 0..18, -1 unlabeled
    m = b["valid"] & (lab >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(lab, 0))
    loss = jnp.sum(jnp.where(m, ce, 0)) / jnp.maximum(jnp.sum(m), 1)
    return loss, stats

  @jax.jit
  def train_step(state, b):
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"],
                                                                 state["batch_stats"], b)
    updates, opt = tx.update(g, state["opt_state"], state["params"])
    return dict(params=optax.apply_updates(state["params"], updates), batch_stats=stats,
                opt_state=opt), loss

  @jax.jit
  def predict(state, b):
    logits, _ = forward({"params": state["params"], "batch_stats": state["batch_stats"]}, b,
                        False)
    return jnp.argmax(logits, -1) + 1           # training ids 1..19

  return train_step, predict


def device_batch(b):
  keys = ("coord", "feats", "labels", "batch", "valid")
  return {k: jnp.asarray(b[k]) for k in keys}


# --------------------------------------------------------------------------- metric
def confusion(pred, labels, valid):
  """19x19 point confusion (rows: truth), unlabeled points excluded."""
  m = valid & (labels > 0)
  idx = (labels[m] - 1) * NUM_CLASSES + (pred[m] - 1)
  return np.bincount(idx, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)


def iou_table(conf):
  """Per-class IoU, SemanticKITTI's mIoU (all 19 classes, absent ones 0, as the official
  semantic-kitti-api) and the mean over the classes present in the truth."""
  conf = np.asarray(conf, np.float64)
  tp = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - tp
  iou = tp / np.maximum(union, 1e-15)
  present = conf.sum(1) > 0
  return dict(iou=iou.tolist(), miou=float(iou.mean()),
              miou_present=float(iou[present].mean()) if present.any() else 0.0,
              present=present.tolist(), accuracy=float(tp.sum() / max(conf.sum(), 1)))


def evaluate(predict, state, pipe, voxel_capacity, voxel_size, max_scans=None):
  conf = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  steps = len(pipe) if max_scans is None else min(len(pipe), -(-max_scans // pipe.batch_size))
  for step in range(steps):
    b = pipe[step]
    check_capacity(b, voxel_capacity, voxel_size)
    pred = np.asarray(predict(state, device_batch(b)))
    conf += confusion(pred, b["labels"], b["valid"])
  return iou_table(conf), conf


def format_table(metrics):
  lines = [f"  {'class':<15} {'IoU':>7}"]
  for name, v, present in zip(SK.CLASS_NAMES, metrics["iou"], metrics["present"]):
    lines.append(f"  {name:<15} {100 * v:7.2f}{'' if present else '   (absent)'}")
  lines.append(f"  {'mIoU (19)':<15} {100 * metrics['miou']:7.2f}   SemanticKITTI's: all 19 "
               "classes")
  lines.append(f"  {'mIoU (present)':<15} {100 * metrics['miou_present']:7.2f}   over the "
               f"{sum(metrics['present'])} classes in the held-out truth")
  lines.append(f"  {'accuracy':<15} {100 * metrics['accuracy']:7.2f}")
  return "\n".join(lines)


def check_capacity(b, voxel_capacity, voxel_size):
  n = count_voxels(b, voxel_size)
  if n > voxel_capacity:
    raise SystemExit(f"a batch has {n} voxels for --voxel-capacity {voxel_capacity}: raise it")
  if int(np.sum(b.get("dropped", 0))):
    print(f"warning: {int(np.sum(b['dropped']))} points cut by --point-capacity", flush=True)


# --------------------------------------------------------------------------- checkpoints
def _flat(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def save_checkpoint(path: pathlib.Path, state, step, config, history):
  """One ``.npz``: every leaf of ``state`` under its key path, plus step / config /
  history (JSON); written to a temporary file and renamed (a crash keeps the old one)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {"state" + k: v for k, v in _flat(state).items()}
  meta = json.dumps(dict(step=int(step), config=config, history=history))
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, __meta__=np.frombuffer(meta.encode(), np.uint8), **arrays)
  os.replace(tmp, path)


def load_meta(path: pathlib.Path):
  with np.load(path) as z:
    return json.loads(bytes(z["__meta__"]).decode())


def load_state(path: pathlib.Path, template):
  """``template``'s tree with the checkpoint's leaves (every key must be there)."""
  with np.load(path) as z:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for p, v in leaves:
      k = "state" + jax.tree_util.keystr(p)
      if k not in z.files:
        raise SystemExit(f"{path}: no {k} (a checkpoint of another configuration?)")
      a = z[k]
      if a.shape != np.shape(v):
        raise SystemExit(f"{path}: {k} is {a.shape}, the model has {np.shape(v)}")
      out.append(jnp.asarray(a, dtype=jnp.asarray(v).dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------- progress
class Progress:
  """A rich progress bar on a terminal (rich comes with flax), else plain lines."""

  def __init__(self, total, start, log_every):
    self.total, self.log_every, self.t0, self.start = total, max(1, log_every), time.time(), start
    self.bar = None
    if sys.stdout.isatty():
      try:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                   TextColumn, TimeRemainingColumn)
        self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
      except ImportError:
        self.bar = None

  def update(self, step, info):
    if self.bar is not None:
      self.bar.update(self.task, completed=step, info=info)
    elif step % self.log_every == 0 or step == self.total:
      rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
      done = int(30 * step / max(self.total, 1))
      print(f"[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} {info} "
            f"({rate:.2f} steps/s)", flush=True)

  def log(self, text):
    if self.bar is not None:
      self.bar.console.print(text)
    else:
      print(text, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.stop()


# --------------------------------------------------------------------------- plot
def plot(path, history, metrics):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(1, 3, figsize=(15, 4))
  if history["loss"]:
    s, l = zip(*history["loss"])
    ax[0].plot(s, l, lw=1)
  ax[0].set(title="training loss", xlabel="step", ylabel="cross entropy")
  if history["eval"]:
    s = [e["step"] for e in history["eval"]]
    ax[1].plot(s, [100 * e["miou"] for e in history["eval"]], "o-", label="mIoU (19 classes)")
    ax[1].plot(s, [100 * e["miou_present"] for e in history["eval"]], "s-",
               label="mIoU (classes present)")
    ax[1].legend()
  ax[1].set(title="held-out mIoU", xlabel="step", ylabel="%")
  if metrics is not None:
    y = np.arange(NUM_CLASSES)
    ax[2].barh(y, 100 * np.asarray(metrics["iou"]),
               color=["C0" if p else "0.8" for p in metrics["present"]])
    ax[2].set_yticks(y, SK.CLASS_NAMES, fontsize=7)
    ax[2].invert_yaxis()
  ax[2].set(title="per-class IoU (grey: absent)", xlabel="IoU %")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# --------------------------------------------------------------------------- main
def prepare_data(args) -> pathlib.Path:
  if args.data is not None:
    if not (args.data / "sequences").is_dir():
      raise SystemExit(f"--data {args.data}: no sequences/ folder (give the folder holding "
                       "sequences/XX/velodyne)")
    return args.data
  if args.eval is not None and (args.eval.parent / "data" / "GENERATED.json").is_file():
    return args.eval.parent / "data"   # the set a default run generated next to its checkpoint
  root = args.workdir / "data"
  marker = root / "GENERATED.json"
  want = dict(train=args.train_scans, val=args.val_scans, az_steps=args.az_steps,
              seed=args.seed)
  if not marker.is_file() or json.loads(marker.read_text()) != want:
    print(f"writing a synthetic SemanticKITTI set to {root} ...", flush=True)
    D.synthetic.write_semantic_kitti(root, {"00": args.train_scans, "08": args.val_scans},
                                     seed=args.seed, az_steps=args.az_steps)
    marker.write_text(json.dumps(want))
  return root


def main(argv=None):
  args = parse_args(argv)
  ckpt = args.workdir / "checkpoint.npz"
  if args.eval is not None:
    meta = load_meta(args.eval)
    for k in CONFIG_KEYS:
      setattr(args, k, meta["config"][k])
    caps = meta["config"]["point_capacity"], meta["config"]["voxel_capacity"]
  data = prepare_data(args)
  train_src, val_src = D.SemanticKITTI(data, "train"), D.SemanticKITTI(data, "valid")
  if len(val_src) == 0:
    raise SystemExit(f"{data}: no scans of the valid split (sequence 08)")
  if args.eval is None:
    if len(train_src) < args.batch_size:
      raise SystemExit(f"{data}: {len(train_src)} training scans for --batch-size "
                       f"{args.batch_size}")
    caps = estimate_capacities(train_src, args.range, args.voxel_size, args.batch_size)
    caps = (args.point_capacity or caps[0], args.voxel_capacity or caps[1])
  point_cap, voxel_cap = caps
  config = dict(model=args.model, width=args.width, voxel_size=args.voxel_size,
                range=args.range, seed=args.seed, point_capacity=point_cap,
                voxel_capacity=voxel_cap)

  model = build_model(args.model, args.width)
  tx = optax.adam(args.lr)
  train_step, predict = make_steps(model, args.voxel_size, voxel_cap, tx)
  val_pipe = D.Pipeline(val_src, functools.partial(make_example, r=args.range,
                                                   augmentation=None),
                        batch_size=1, capacity=point_cap // args.batch_size + 256,
                        collate="pack", shuffle=False, on_overflow="truncate")

  dummy = device_batch(val_pipe[0])
  x, _ = M.tensor_field_quantize(dummy["coord"], dummy["feats"], args.voxel_size,
                                 batch=dummy["batch"], valid=dummy["valid"], capacity=voxel_cap)
  variables = jax.jit(model.init)(jax.random.key(args.seed), x)
  state = dict(params=variables["params"], batch_stats=variables["batch_stats"],
               opt_state=tx.init(variables["params"]))
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(state["params"]))

  if args.eval is not None:
    state = load_state(args.eval, state)
    print(f"evaluating {args.eval} (step {meta['step']}, {config['model']} width "
          f"{config['width']}, {n_params} parameters) on {len(val_src)} held-out scans",
          flush=True)
    metrics, _ = evaluate(predict, state, val_pipe, voxel_cap, args.voxel_size,
                          args.max_eval_scans)
    print(format_table(metrics), flush=True)
    print(f"mIoU {100 * metrics['miou']:.2f}", flush=True)
    return metrics

  history = dict(loss=[], eval=[])
  start = 0
  if ckpt.is_file() and not args.fresh:
    meta = load_meta(ckpt)
    differ = {k: (meta["config"].get(k), config[k]) for k in config
              if meta["config"].get(k) != config[k]}
    if differ:
      raise SystemExit(f"{ckpt} was written with another configuration {differ}: use --fresh "
                       "or another --workdir")
    state = load_state(ckpt, state)
    start, history = meta["step"], meta["history"]
    print(f"resumed from step {start} ({ckpt})", flush=True)

  train_pipe = D.Pipeline(train_src, functools.partial(make_example, r=args.range,
                                                       augmentation=AUGMENTATION),
                          batch_size=args.batch_size, capacity=point_cap, seed=args.seed,
                          collate="pack", on_overflow="truncate",
                          num_epochs=-(-args.steps // max(1, len(train_src) // args.batch_size)))
  print(f"{config['model']} width {args.width}: {n_params} parameters; {len(train_src)} "
        f"training scans, {len(val_src)} held-out; {point_cap} points / {voxel_cap} voxels "
        f"per batch; steps {start} -> {args.steps}", flush=True)

  metrics = history["eval"][-1] if history["eval"] else None
  progress = Progress(args.steps, start, args.log_every)
  t_first = time.time()
  try:
    for b in train_pipe.batches(start, max(0, args.steps - start)):
      step = int(b["step"]) + 1
      check_capacity(b, voxel_cap, args.voxel_size)
      state, loss = train_step(state, device_batch(b))
      loss = float(loss)
      if not np.isfinite(loss):
        raise SystemExit(f"step {step}: the loss is {loss}")
      history["loss"].append((step, loss))
      if step == start + 1:
        progress.log(f"first step (compiling included) {time.time() - t_first:.1f} s")
      progress.update(step, f"loss {loss:.3f}")
      last = step == args.steps
      if (args.eval_every and step % args.eval_every == 0) or last:
        metrics, _ = evaluate(predict, state, val_pipe, voxel_cap, args.voxel_size,
                              args.max_eval_scans)
        metrics["step"] = step
        history["eval"].append(metrics)
        progress.log(f"step {step}: held-out mIoU {100 * metrics['miou']:.2f} "
                     f"(present classes {100 * metrics['miou_present']:.2f})")
      if step % args.ckpt_every == 0 or last:
        save_checkpoint(ckpt, state, step, config, history)
        if args.keep_checkpoints:
          save_checkpoint(ckpt.with_name(f"checkpoint_{step:06d}.npz"), state, step, config,
                          history)
  finally:
    progress.close()

  if metrics is None:  # nothing left to train: evaluate what the checkpoint holds
    metrics, _ = evaluate(predict, state, val_pipe, voxel_cap, args.voxel_size,
                          args.max_eval_scans)
  print(f"held-out scans ({len(val_src)}), step {max(start, args.steps)}:", flush=True)
  print(format_table(metrics), flush=True)
  print(f"mIoU {100 * metrics['miou']:.2f}", flush=True)
  (args.workdir / "metrics.json").write_text(json.dumps(dict(config=config, final=metrics,
                                                             history=history), indent=1))
  if not args.no_plot:
    plot(args.workdir / "training.png", history, metrics)
    print(f"plot: {args.workdir / 'training.png'}", flush=True)
  return metrics


if __name__ == "__main__":
  main()

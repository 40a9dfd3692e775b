"""Main demo: train Open3D-ML's SparseConvUnet on procedural rooms, ``python -m jax_sparseconv.demo``.

Generates labelled rooms (floor, walls, tables, chairs, balls, columns; no downloads),
trains :class:`jax_sparseconv.models.SparseConvUnet` (a small multiplier) with optax on
a padded batch of rooms, evaluates per-class IoU and mIoU on held-out rooms, writes
``training.png`` (loss and mIoU curves) and ``predictions.png`` (ground truth vs
prediction, top-down) to ``--out``, checkpoints with orbax every ``--ckpt-every`` steps
and at the end (``--resume`` continues; Ctrl-C saves first). The data order and the
augmentation are functions of the step, so a resumed run ends with the same parameters
as an uninterrupted one. ``--devices N`` trains data-parallel with ``jax.shard_map``
(on the CPU, N host devices are forced). The last line is ``mIoU=<value>``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time


def _parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="./demo_out", help="output folder (plots, checkpoints)")
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--scenes", type=int, default=24, help="training rooms")
  ap.add_argument("--eval-scenes", type=int, default=6, help="held-out rooms")
  ap.add_argument("--batch", type=int, default=2, help="rooms per step (a multiple of --devices)")
  ap.add_argument("--multiplier", type=int, default=8)
  ap.add_argument("--levels", type=int, default=5, help="U-Net depth (Open3D-ML: 7)")
  ap.add_argument("--voxel-size", type=float, default=0.1)
  ap.add_argument("--lr", type=float, default=5e-3)
  ap.add_argument("--eval-every", type=int, default=100)
  ap.add_argument("--ckpt-every", type=int, default=100)
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests
  ap.add_argument("--no-plots", action="store_true")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
  if args.devices > 1:  # forced host devices: read when JAX's CPU backend starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  return _Run(args).run()


class _Run:
  """One training run: data, model, step functions, checkpoints, evaluation, plots."""

  def __init__(self, args):
    import jax
    import numpy as np

    from jax_sparseconv import scenes
    from jax_sparseconv.models import SparseConvUnet, unet_level_sizes

    self.args, self.jax, self.np = args, jax, np
    if args.batch % args.devices:
      raise SystemExit("--batch must be a multiple of --devices")
    if len(jax.devices()) < args.devices:
      raise SystemExit(f"--devices {args.devices}: only {len(jax.devices())} devices")
    self.out = pathlib.Path(args.out)
    self.out.mkdir(parents=True, exist_ok=True)
    self.labels = scenes.ROOM_LABELS
    rooms = [self._room(s) for s in range(args.scenes + args.eval_scenes)]
    self.train_rooms, self.eval_rooms = rooms[:args.scenes], rooms[args.scenes:]
    self.n = max(len(r[0]) for r in rooms)
    sizes = unet_level_sizes([r[0] for r in rooms], levels=args.levels)
    # Capacities: the largest room of each level (augmentation flips keep the counts
    # within one voxel per axis; a margin of 10% covers it), fixed for one compilation.
    self.caps = tuple(int(max(s[i] for s in sizes) * 1.1) + 8 for i in range(args.levels))
    axis = "d" if args.devices > 1 else None
    self.model = SparseConvUnet(multiplier=args.multiplier, num_classes=len(self.labels),
                                num_levels=args.levels, axis_name=axis)

  def _room(self, index):
    """A room in voxel units (non-negative), its colours and labels."""
    from jax_sparseconv import scenes
    pts, rgb, lab = scenes.room_points(self.args.seed * 100_003 + index)
    pts = pts / self.args.voxel_size
    return (pts - pts.min(0) + 1.0).astype("float32"), rgb, lab

  def _batch(self, rooms, step):
    """A padded batch: ``(B, n, 3)`` points, feats, labels and ``(B,)`` counts; the rooms
    and their flips are a function of ``step`` only."""
    np = self.np
    rng = np.random.default_rng([self.args.seed, max(step, 0)])
    pick = rng.choice(len(rooms), self.args.batch, replace=False) if step >= 0 else range(
        len(rooms))
    P = np.zeros((len(pick), self.n, 3), np.float32)
    F = np.zeros((len(pick), self.n, 3), np.float32)
    L = np.zeros((len(pick), self.n), np.int32)
    K = np.zeros((len(pick),), np.int32)
    for b, i in enumerate(pick):
      p, f, lab = rooms[i]
      if step >= 0:  # augmentation: mirror x and/or y
        p = p.copy()
        for axis in (0, 1):
          if rng.random() < 0.5:
            p[:, axis] = p[:, axis].max() + 1.0 - p[:, axis]
      k = len(p)
      P[b, :k], F[b, :k], L[b, :k], K[b] = p, f, lab, k
    return P, F, L, K

  # ------------------------------------------------------------------ the step functions

  def _functions(self):
    self.opt, self.train_step, self.predict, self.place, self.replicate = _compiled(
        self.model, self.caps, self.args.lr, self.args.devices)

  def _init_state(self):
    import jax.numpy as jnp
    P, F, _, K = self._batch(self.train_rooms, 0)
    variables = self.model.clone(axis_name=None).init(
        self.jax.random.key(self.args.seed), P[:1], F[:1], valid=K[:1], capacities=self.caps)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "opt_state": self.opt.init(variables["params"]), "step": jnp.int32(0)}

  # ------------------------------------------------------------------ checkpoints

  def _checkpointer(self):
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()

  def _ckpt_dir(self):
    return (self.out / "checkpoints").resolve()

  def _save(self, state, history):
    np = self.np
    step = int(state["step"])
    path = self._ckpt_dir() / f"step_{step:06d}"
    if path.exists():
      return
    ckpt = self._checkpointer()
    ckpt.save(path, self.jax.tree_util.tree_map(np.asarray, state))
    ckpt.wait_until_finished()
    (self._ckpt_dir() / "history.json").write_text(json.dumps(history))

  def _restore(self, state):
    paths = sorted(self._ckpt_dir().glob("step_*")) if self._ckpt_dir().exists() else []
    if not paths:
      return state, {"loss": [], "eval": []}
    ckpt = self._checkpointer()
    target = self.jax.tree_util.tree_map(self.np.asarray, state)
    restored = ckpt.restore(paths[-1], target)
    history = json.loads((self._ckpt_dir() / "history.json").read_text())
    history["loss"] = history["loss"][:int(restored["step"])]
    history["eval"] = [e for e in history["eval"] if e[0] <= int(restored["step"])]
    return restored, history

  # ------------------------------------------------------------------ evaluation

  def evaluate(self, state):
    """Per-class IoU over the points of the held-out rooms."""
    np = self.np
    c = len(self.labels)
    conf = np.zeros((c, c), np.int64)
    for i in range(0, len(self.eval_rooms), self.args.batch):
      rooms = self.eval_rooms[i:i + self.args.batch]
      P, F, L, K = self._batch(rooms, -1)
      pred = np.asarray(self.predict(state["params"], state["batch_stats"], P, F, K))
      for b, k in enumerate(K):
        conf += np.bincount(L[b, :k] * c + pred[b, :k], minlength=c * c).reshape(c, c)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return iou, conf

  # ------------------------------------------------------------------ the run

  def run(self) -> int:
    """Start (or resume), train, save, report: the run in four named steps."""
    state, history = self._start()
    state, interrupted = self._train(state, history)
    self._save(state, history)
    if interrupted:
      print(f"interrupted: checkpoint saved at step {int(state['step'])} in "
            f"{self._ckpt_dir()} (continue with --resume)")
      return 130
    return self._report(state, history)

  def _start(self):
    """The compiled functions, and the initial or restored state and history."""
    jax, args = self.jax, self.args
    self._functions()
    state = self._init_state()
    history = {"loss": [], "eval": []}
    if args.resume:
      state, history = self._restore(state)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{args.devices}; "
          f"{len(self.train_rooms)} training rooms, {len(self.eval_rooms)} held out, "
          f"capacities per level {self.caps}; steps {int(state['step'])} -> {args.steps}")
    self.t0 = time.perf_counter()
    return self.replicate(state), history

  def _progress(self):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    return Progress(*columns, transient=not sys.stdout.isatty())

  def _train(self, state, history):
    """The training loop, with a progress bar, evaluations and checkpoints; returns the
    state and whether it was interrupted (Ctrl-C, or ``--stop-after``)."""
    args, points = self.args, 0
    start = int(state["step"])
    with self._progress() as progress:
      task = progress.add_task("train", total=args.steps, completed=start, info="")
      try:
        for step in range(start, args.steps):
          if args.stop_after is not None and step >= args.stop_after:
            raise KeyboardInterrupt
          state, loss, n = self._step(state, step)
          history["loss"].append(loss)
          points += n
          rate = points / (time.perf_counter() - self.t0)
          progress.update(task, advance=1, info=f"loss {loss:.3f}  {rate:,.0f} points/s")
          self._after_step(step + 1, state, history, loss, progress.console)
      except KeyboardInterrupt:
        return state, True
    return state, False

  def _step(self, state, step):
    """One optimiser step on the batch of ``step``: the state, the loss, the points."""
    P, F, L, K = self._batch(self.train_rooms, step)
    state, loss = self.train_step(state, *map(self.place, (P, F, L, K)))
    return state, float(loss), int(K.sum())

  def _after_step(self, done, state, history, loss, console):
    """Evaluation and checkpoint after step ``done`` when they are due."""
    if done % self.args.eval_every == 0 or done == self.args.steps:
      miou = float(self.np.nanmean(self.evaluate(state)[0]))
      history["eval"].append([done, miou])
      console.print(f"step {done}: loss {loss:.4f}, held-out mIoU {miou:.3f}")
    if done % self.args.ckpt_every == 0:
      self._save(state, history)

  def _report(self, state, history) -> int:
    """Per-class IoU, plots, and the last line ``mIoU=<value>``."""
    iou, _ = self.evaluate(state)
    miou = float(self.np.nanmean(iou))
    for name, v in zip(self.labels, iou):
      print(f"  IoU {name:7s} {v:.3f}")
    if not self.args.no_plots:
      self._plot_curves(history)
      self._plot_predictions(state)
      print(f"plots: {self.out / 'training.png'}, {self.out / 'predictions.png'}")
    print(f"trained {self.args.steps} steps in {time.perf_counter() - self.t0:.0f} s this run")
    print(f"mIoU={miou:.4f}")
    return 0

  def _plot_curves(self, history):
    """``training.png``: the loss and the held-out mIoU over the steps."""
    plt, np = _pyplot(), self.np
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(np.arange(1, len(history["loss"]) + 1), history["loss"])
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    if history["eval"]:
      e = np.asarray(history["eval"])
      ax[1].plot(e[:, 0], e[:, 1], "o-")
    ax[1].set(xlabel="step", ylabel="mIoU", ylim=(0, 1), title="held-out mIoU")
    fig.tight_layout()
    fig.savefig(self.out / "training.png", dpi=100)
    plt.close(fig)

  def _plot_predictions(self, state):
    """``predictions.png``: ground truth and prediction of a held-out room, top-down."""
    plt, np = _pyplot(), self.np
    P, F, L, K = self._batch(self.eval_rooms[:1], -1)
    pred = np.asarray(self.predict(state["params"], state["batch_stats"], P, F, K))[0, :K[0]]
    p, lab = P[0, :K[0]], L[0, :K[0]]
    order = np.argsort(p[:, 2])  # draw low points first: a top-down view
    cmap = plt.get_cmap("tab10", len(self.labels))
    fig, ax = plt.subplots(1, 2, figsize=(11, 5))
    for a, values, title in ((ax[0], lab, "ground truth"), (ax[1], pred, "prediction")):
      a.scatter(p[order, 0], p[order, 1], c=values[order], cmap=cmap, vmin=-0.5,
                vmax=len(self.labels) - 0.5, s=1)
      a.set(title=title, aspect="equal", xticks=[], yticks=[])
    handles = [plt.Line2D([], [], ls="", marker="o", color=cmap(i), label=n)
               for i, n in enumerate(self.labels)]
    fig.legend(handles=handles, loc="lower center", ncol=len(self.labels))
    fig.savefig(self.out / "predictions.png", dpi=100)
    plt.close(fig)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


@functools.lru_cache(maxsize=4)
def _compiled(model, caps, lr, devices):
  """``(optimizer, train_step, predict, place, replicate)`` for one configuration, cached
  so that runs in one process (tests, a resumed run) share the compiled programs."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec as P

  opt = optax.adam(lr)

  def loss_fn(params, stats, pts, feats, labels, counts, total):
    logits, upd = model.apply({"params": params, "batch_stats": stats}, pts, feats,
                              valid=counts, train=True, capacities=caps,
                              mutable=["batch_stats"])
    valid = jnp.arange(pts.shape[1])[None, :] < counts[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / total, upd["batch_stats"]

  def step(state, pts, feats, labels, counts):
    total = jnp.sum(counts).astype(jnp.float32)
    if devices > 1:
      total = jax.lax.psum(total, "d")
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], pts, feats, labels, counts, total)
    if devices > 1:  # replicated params: their gradients arrive summed over the devices
      loss = jax.lax.psum(loss, "d")
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
            "opt_state": opt_state, "step": state["step"] + 1}, loss

  place = replicate = lambda a: a
  if devices > 1:
    mesh = jax.make_mesh((devices,), ("d",))
    data, full = jax.sharding.NamedSharding(mesh, P("d")), jax.sharding.NamedSharding(mesh, P())
    place = lambda a: jax.device_put(a, data)  # noqa: E731
    replicate = lambda t: jax.device_put(t, full)  # noqa: E731
    step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d"), P("d"), P("d"), P("d")),
                         out_specs=(P(), P()))
  eval_model = model.clone(axis_name=None)

  def predict(params, stats, pts, feats, counts):
    logits = eval_model.apply({"params": params, "batch_stats": stats}, pts, feats,
                              valid=counts, capacities=caps)
    return jnp.argmax(logits, axis=-1)

  return opt, jax.jit(step, donate_argnums=0), jax.jit(predict), place, replicate


if __name__ == "__main__":
  raise SystemExit(main())

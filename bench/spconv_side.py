"""spconv 2.3.8's side of ``bench/spconv_bench.py`` (runs in spconv's own Python 3.11
environment): ``python spconv_side.py CLOUDS.npz kinds C repeats ROWS_JSON``; prints one
JSON line ``{kind: {row: ms}}`` (forward + backward of the layer, indice pairs built in
the forward as spconv does, one torch thread). Rows with groups > 1 are skipped (spconv
has no grouped conv)."""

import json
import sys
import time

import numpy as np
import spconv.pytorch as spconv
import torch
from spconv.pytorch import ops

ops.get_current_stream = lambda: 0  # the CPU backward asks torch.cuda otherwise
torch.set_num_threads(1)  # spconv's CPU results are wrong with more threads


def main():
  path, kinds, c, repeats, rows = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), \
      int(sys.argv[4]), json.loads(sys.argv[5])
  data = np.load(path)
  rng = np.random.default_rng(1)
  out = {}
  for kind in kinds:
    idx = torch.from_numpy(data[f"{kind}_indices"])
    shape = [int(s) for s in data[f"{kind}_shape"]]
    feats = torch.from_numpy(rng.standard_normal((len(idx), c)).astype(np.float32))
    out[kind] = {}
    for row, (op, k, s, p, d, g) in rows.items():
      if g != 1:
        continue
      if op == "subm":
        layer = spconv.SubMConv3d(c, c, k, dilation=d, bias=False)
      else:
        layer = spconv.SparseConv3d(c, c, k, stride=s, padding=p, dilation=d, bias=False)
      layer.train()

      def step():
        f = feats.clone().requires_grad_(True)
        x = spconv.SparseConvTensor(f, idx, shape, 1)
        y = layer(x)
        (y.features ** 2).sum().backward()
        layer.zero_grad(set_to_none=True)

      step()
      times = []
      for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
      out[kind][row] = 1e3 * float(np.median(times))
  print(json.dumps(out))


if __name__ == "__main__":
  main()

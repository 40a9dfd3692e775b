"""PLY point clouds: a reader and a writer for the three encodings (NumPy only).

A PLY file is a text header, then the elements' rows in order::

  ply
  format binary_little_endian 1.0      (or ascii 1.0, binary_big_endian 1.0)
  comment anything
  element vertex 3
  property float x
  property float y
  property float z
  property uchar red                   (optional: green, blue, nx, ny, nz, intensity,
  ...                                   label, anything else)
  element face 1                       (optional: other elements, list properties)
  property list uchar int vertex_indices
  end_header
  <rows>

:func:`read_ply` returns one element as a NumPy structured array whose dtype comes
from the header (``float`` -> float32, ``uchar`` -> uint8, ... in native byte order);
elements before it are parsed and skipped, list properties included. :func:`write_ply`
writes structured arrays (or dicts of columns) back; ASCII floats are written with
enough digits (9 for float32, 17 for float64) to read back bit for bit.
:func:`read_ply_cloud` / :func:`write_ply_cloud` map the usual vertex properties to
arrays: ``coord (P, 3)``, ``color (P, 3)``, ``normal (P, 3)``, ``intensity (P,)``,
``label (P,)``.
"""

from __future__ import annotations

import os

import numpy as np

#: PLY scalar types and their NumPy types (both the names of the spec and the sized ones).
PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_NAMES = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int",
          "u4": "uint", "f4": "float", "f8": "double"}
FORMATS = ("ascii", "binary_little_endian", "binary_big_endian")
_ORDER = {"binary_little_endian": "<", "binary_big_endian": ">", "ascii": "="}


class PlyElement:
  """One ``element`` of a PLY header.

  Attributes:
    name: the element's name (``vertex``, ``face``, ...).
    count: its number of rows.
    properties: ``[(name, numpy type code)]`` for scalar properties and
      ``[(name, (count type code, item type code))]`` for list properties, in order.
  """

  def __init__(self, name: str, count: int):
    self.name, self.count, self.properties = name, count, []

  @property
  def has_lists(self) -> bool:
    """Whether the element has list properties (read row by row)."""
    return any(isinstance(t, tuple) for _, t in self.properties)

  def dtype(self, order: str = "=") -> np.dtype:
    """The structured dtype of a row of scalar properties (lists become ``object``)."""
    return np.dtype([(n, object if isinstance(t, tuple) else order + t)
                     for n, t in self.properties])

  def __repr__(self):
    return f"PlyElement({self.name!r}, {self.count}, {self.properties})"


def read_ply_header(f) -> tuple[str, list[PlyElement], list[str]]:
  """Parses the header of an open binary file, leaving it at the first row.

  Returns:
    ``(format, elements, comments)``: one of :data:`FORMATS`, the elements in file
    order, the comment lines.

  Raises:
    ValueError: not a PLY file, an unknown format, type or header line.
  """
  if f.readline().strip() != b"ply":
    raise ValueError("not a PLY file (no 'ply' magic line)")
  fmt, elements, comments = None, [], []
  while True:
    line = f.readline()
    if not line:
      raise ValueError("PLY header has no end_header line")
    words = line.decode("ascii", "replace").split()
    if not words:
      continue
    key = words[0]
    if key == "end_header":
      break
    if key == "format":
      if len(words) != 3 or words[1] not in FORMATS:
        raise ValueError(f"unsupported PLY format line: {line!r}")
      fmt = words[1]
    elif key in ("comment", "obj_info"):
      comments.append(line.decode("ascii", "replace").rstrip("\r\n")[len(key) + 1:])
    elif key == "element":
      elements.append(PlyElement(words[1], int(words[2])))
    elif key == "property":
      if not elements:
        raise ValueError("PLY property before any element")
      if words[1] == "list":
        elements[-1].properties.append((words[4], (_type(words[2]), _type(words[3]))))
      else:
        elements[-1].properties.append((words[2], _type(words[1])))
    else:
      raise ValueError(f"unknown PLY header line: {line!r}")
  if fmt is None:
    raise ValueError("PLY header has no format line")
  return fmt, elements, comments


def _type(name):
  if name not in PLY_TYPES:
    raise ValueError(f"unknown PLY type {name!r}")
  return PLY_TYPES[name]


def _read_binary(f, el, order):
  if not el.has_lists:
    dtype = el.dtype(order)
    buf = f.read(dtype.itemsize * el.count)
    if len(buf) != dtype.itemsize * el.count:
      raise ValueError(f"PLY file ends inside element {el.name!r}")
    return np.frombuffer(buf, dtype, el.count)
  out = np.empty(el.count, el.dtype())
  for i in range(el.count):  # list properties: row by row
    for name, t in el.properties:
      if isinstance(t, tuple):
        ct, it = np.dtype(order + t[0]), np.dtype(order + t[1])
        n = int(np.frombuffer(f.read(ct.itemsize), ct)[0])
        out[name][i] = np.frombuffer(f.read(n * it.itemsize), it, n).astype(it.newbyteorder("="))
      else:
        dt = np.dtype(order + t)
        out[name][i] = np.frombuffer(f.read(dt.itemsize), dt)[0]
  return out


def _read_ascii(tokens, pos, el):
  if not el.has_lists:
    k = len(el.properties)
    rows = tokens[pos:pos + k * el.count]
    if len(rows) != k * el.count:
      raise ValueError(f"PLY file ends inside element {el.name!r}")
    table = np.asarray(rows).reshape(el.count, k)
    out = np.empty(el.count, el.dtype())
    for j, (name, t) in enumerate(el.properties):
      col = table[:, j]
      # floats through float64: exact for what write_ply writes (9 / 17 digits)
      out[name] = col.astype(np.float64) if t[0] == "f" else col.astype(np.int64)
    return out, pos + k * el.count
  out = np.empty(el.count, el.dtype())
  for i in range(el.count):
    for name, t in el.properties:
      if isinstance(t, tuple):
        n = int(tokens[pos])
        conv = np.float64 if t[1][0] == "f" else np.int64
        out[name][i] = np.asarray(tokens[pos + 1:pos + 1 + n]).astype(conv).astype(t[1])
        pos += 1 + n
      else:
        out[name][i] = np.asarray(tokens[pos]).astype(np.float64 if t[0] == "f" else np.int64)
        pos += 1
  return out, pos


def read_ply(path: str | os.PathLike, element: str = "vertex") -> np.ndarray:
  """Reads one element of a PLY file (any of the three encodings).

  Args:
    path: the file.
    element: which element (``vertex`` for a point cloud).

  Returns:
    A structured array of ``count`` rows with one field per property, in header
    order and native byte order (list properties: ``object`` fields holding arrays).

  Raises:
    ValueError: a malformed file, or no such element.
  """
  with open(path, "rb") as f:
    fmt, elements, _ = read_ply_header(f)
    if element not in [e.name for e in elements]:
      raise ValueError(f"{path}: no element {element!r} (has {[e.name for e in elements]})")
    if fmt == "ascii":
      tokens, pos = f.read().split(), 0
      for el in elements:
        arr, pos = _read_ascii(tokens, pos, el)
        if el.name == element:
          return arr
    for el in elements:
      arr = _read_binary(f, el, _ORDER[fmt])
      if el.name == element:
        return arr.astype(el.dtype("="))  # a native-order copy
  raise AssertionError("unreachable")


def _as_structured(data) -> np.ndarray:
  if isinstance(data, np.ndarray) and data.dtype.names:
    return data
  cols = {k: np.asarray(v) for k, v in dict(data).items()}
  n = {len(v) for v in cols.values()}
  if len(n) != 1:
    raise ValueError(f"columns of different lengths: { {k: len(v) for k, v in cols.items()} }")
  out = np.empty(n.pop(), [(k, v.dtype) for k, v in cols.items()])
  for k, v in cols.items():
    out[k] = v
  return out


def write_ply(path: str | os.PathLike, vertex, *, format: str = "binary_little_endian",
              comments=(), faces=None) -> None:
  """Writes a PLY file with a ``vertex`` element (and optionally triangle faces).

  Args:
    path: the file to write.
    vertex: a structured array, or a mapping of property name to ``(P,)`` column;
      column types must be PLY types (int8..uint32, float32, float64; int64 and bool
      are not).
    format: one of :data:`FORMATS`.
    comments: ``comment`` lines for the header.
    faces: optional int ``(F, k)`` vertex indices, written as a ``face`` element with
      ``property list uchar int vertex_indices``.
  """
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  v = _as_structured(vertex)
  props = []
  for name in v.dtype.names:
    dt = v.dtype[name]
    code = dt.kind + str(dt.itemsize)
    if code not in _NAMES or dt.shape:
      raise ValueError(f"property {name!r} has dtype {dt}: not a PLY scalar type")
    props.append((name, code))
  lines = ["ply", f"format {format} 1.0"] + [f"comment {c}" for c in comments]
  lines += [f"element vertex {len(v)}"] + [f"property {_NAMES[c]} {n}" for n, c in props]
  if faces is not None:
    faces = np.asarray(faces, np.int64)
    lines += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
  header = ("\n".join(lines) + "\nend_header\n").encode("ascii")
  with open(path, "wb") as f:
    f.write(header)
    if format == "ascii":
      fmts = {"f4": "%.9g", "f8": "%.17g"}
      cols = [v[n] for n, _ in props]
      fmt = " ".join(fmts.get(c, "%d") for _, c in props)
      body = "\n".join(fmt % tuple(r) for r in zip(*cols)) if len(v) else ""
      f.write((body + "\n" if body else "").encode("ascii"))
      if faces is not None:
        f.write("".join(f"{len(r)} " + " ".join(map(str, r)) + "\n"
                        for r in faces.tolist()).encode("ascii"))
    else:
      order = _ORDER[format]
      f.write(v.astype([(n, order + c) for n, c in props]).tobytes())
      if faces is not None:
        k = faces.shape[1]
        rows = np.empty(len(faces), [("n", "u1"), ("i", order + "i4", (k,))])
        rows["n"], rows["i"] = k, faces
        f.write(rows.tobytes())


#: Vertex properties :func:`read_ply_cloud` gathers, by the key it returns them under.
CLOUD_PROPERTIES = {"coord": ("x", "y", "z"), "color": ("red", "green", "blue"),
                    "normal": ("nx", "ny", "nz"), "intensity": ("intensity",),
                    "label": ("label",)}


def read_ply_cloud(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A PLY point cloud as arrays.

  Returns:
    ``dict(coord=(P, 3))`` plus, where the file has them, ``color (P, 3)`` (the file's
    type, uint8 usually), ``normal (P, 3)``, ``intensity (P,)``, ``label (P,)``;
    grouped columns take the type of their first property. Other vertex properties
    come under their own names as ``(P,)`` columns.
  """
  v = read_ply(path, "vertex")
  names = set(v.dtype.names)
  if not {"x", "y", "z"} <= names:
    raise ValueError(f"{path}: vertex element has no x, y, z properties")
  out, used = {}, set()
  for key, props in CLOUD_PROPERTIES.items():
    if set(props) <= names:
      col = np.stack([v[p] for p in props], 1).astype(v.dtype[props[0]])
      out[key] = col if len(props) > 1 else col[:, 0]
      used |= set(props)
  for name in v.dtype.names:
    if name not in used:
      out[name] = np.ascontiguousarray(v[name])
  return out


def write_ply_cloud(path: str | os.PathLike, coord, *, color=None, normal=None,
                    intensity=None, label=None, format: str = "binary_little_endian",
                    comments=()) -> None:
  """Writes a point cloud as a PLY ``vertex`` element.

  Args:
    coord: float ``(P, 3)`` positions (float32 or float64; others become float32).
    color: optional ``(P, 3)`` RGB; uint8 as is, floats in [0, 1] are scaled to
      0..255 and rounded.
    normal: optional float ``(P, 3)``.
    intensity: optional ``(P,)`` (float32, or any PLY type).
    label: optional int ``(P,)`` (int64 is written as int32).
    format: one of :data:`FORMATS`.
    comments: header comment lines.
  """
  coord = np.asarray(coord)
  if coord.ndim != 2 or coord.shape[1] != 3:
    raise ValueError(f"coord must be (P, 3), got {coord.shape}")
  fdt = coord.dtype if coord.dtype in (np.float32, np.float64) else np.float32
  cols = {"x": coord[:, 0].astype(fdt), "y": coord[:, 1].astype(fdt),
          "z": coord[:, 2].astype(fdt)}
  if color is not None:
    color = np.asarray(color)
    if color.dtype.kind == "f":
      color = np.round(np.clip(color, 0, 1) * 255)
    color = color.astype(np.uint8)
    cols.update(red=color[:, 0], green=color[:, 1], blue=color[:, 2])
  if normal is not None:
    normal = np.asarray(normal)
    ndt = normal.dtype if normal.dtype in (np.float32, np.float64) else np.float32
    cols.update(nx=normal[:, 0].astype(ndt), ny=normal[:, 1].astype(ndt),
                nz=normal[:, 2].astype(ndt))
  if intensity is not None:
    intensity = np.asarray(intensity)
    cols["intensity"] = intensity.astype(np.float32) if intensity.dtype.kind in "fb" or \
        intensity.dtype.itemsize > 4 else intensity
  if label is not None:
    label = np.asarray(label)
    cols["label"] = label.astype(np.int32) if label.dtype.itemsize > 4 or \
        label.dtype.kind == "b" else label
  write_ply(path, cols, format=format, comments=comments)

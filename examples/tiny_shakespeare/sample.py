"""Samples text from a trained Tiny Shakespeare run.

  python -m examples.tiny_shakespeare.sample --workdir=DIR --prompt="ROMEO:" --num_tokens=500

Restores the model of the run's latest checkpoint (``--best``: the one with the
best validation loss; ``--step``: a given step) and prints the prompt and its
continuation. The vocabulary comes from the checkpoint (the dataset ``info``
saved with it), so sampling needs neither the text nor the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from absl import app, flags

from adamw_flax import checkpoint
from examples.tiny_shakespeare.data import CharVocab
from examples.tiny_shakespeare.model import generate


class Codec(Protocol):
  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Any) -> str: ...


def sample_text(
  model: Any,
  codec: Codec,
  prompt: str,
  num_tokens: int,
  *,
  seed: int = 0,
  temperature: float = 1.0,
  top_k: int | None = None,
) -> str:
  """Returns ``prompt`` followed by ``num_tokens`` sampled characters.

  Args:
    model: a :class:`~examples.tiny_shakespeare.model.CharTransformer`.
    codec: what maps text to ids and back (a ``CharDataset`` or ``CharVocab``
      of the run's vocabulary).
    prompt: the start of the text (at least one character of the vocabulary).
    num_tokens: characters to sample.
    seed: sampling seed; the same seed gives the same text.
    temperature: softmax temperature; 0 takes the most likely character.
    top_k: sample among the ``top_k`` most likely characters (None: all).

  Returns:
    The prompt and the sampled continuation.

  Raises:
    ValueError: the prompt is empty or has characters outside the vocabulary.
  """
  if not prompt:
    raise ValueError("prompt must hold at least one character, e.g. '\\n'")
  ids = generate(
    model,
    codec.encode(prompt),
    num_tokens,
    rng=jax.random.key(seed),
    temperature=temperature,
    top_k=top_k,
  )
  return codec.decode(np.asarray(ids))


def sample_from_workdir(
  workdir: str | Path,
  prompt: str,
  num_tokens: int,
  *,
  seed: int = 0,
  temperature: float = 1.0,
  top_k: int | None = None,
  step: int | None = None,
  best: bool = False,
  ema: bool = False,
) -> str:
  """Samples from a checkpoint of a training run (see :func:`sample_text`).

  Args:
    workdir: the run directory (``config.json``, ``checkpoints/``).
    prompt: the start of the text.
    num_tokens: characters to sample.
    seed: sampling seed.
    temperature: softmax temperature; 0 takes the most likely character.
    top_k: sample among the ``top_k`` most likely characters (None: all).
    step: the checkpoint step (default: the latest).
    best: take the checkpoint of the best validation loss instead.
    ema: sample from the EMA weights (a run with ``trainer.ema_decay``).

  Returns:
    The prompt and the sampled continuation.

  Raises:
    FileNotFoundError: ``workdir`` is not a run or has no complete checkpoint.
  """
  workdir = Path(workdir)
  if not (workdir / "config.json").is_file():
    raise FileNotFoundError(f"{workdir} has no config.json: not a training run directory")
  with checkpoint.CheckpointReader(workdir) as reader:
    if best:
      step = reader.best_step("loss")
    elif step is None:
      step = reader.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no complete checkpoint")
    chars = reader.meta(step)["data_info"]["chars"]
  model = checkpoint.restore_params(workdir, step=step, ema=ema)
  return sample_text(
    model, CharVocab(chars), prompt, num_tokens, seed=seed, temperature=temperature, top_k=top_k
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    text = sample_from_workdir(
      f.workdir,
      f.prompt,
      f.num_tokens,
      seed=f.seed,
      temperature=f.temperature,
      top_k=f.top_k,
      step=f.step,
      best=f.best,
      ema=f.ema,
    )
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  print(text)


def _define_flags() -> None:
  # Defined only when run as a script: importing sample_text must not add
  # absl flags that could clash with another program's (train/ has --workdir).
  flags.DEFINE_string("workdir", None, "Run directory (holds config.json, checkpoints/).")
  flags.DEFINE_string("prompt", "\n", "Start of the text.")
  flags.DEFINE_integer("num_tokens", 500, "Characters to sample.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature (0 = greedy).")
  flags.DEFINE_integer("top_k", None, "Sample among the k most likely characters.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("best", False, "Use the checkpoint of the best validation loss.")
  flags.DEFINE_bool("ema", False, "Sample from the EMA weights (trainer.ema_decay > 0).")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

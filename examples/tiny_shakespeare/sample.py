"""Samples text from a trained Tiny Shakespeare run.

  python -m examples.tiny_shakespeare.sample --workdir=DIR --prompt="ROMEO:" --num_tokens=500

Restores the model of the run's latest checkpoint (``--best``: the one with the
best validation loss; ``--step``: a given step) and prints the prompt and its
continuation. The vocabulary comes from the checkpoint (the dataset ``info``
saved with it), so sampling needs neither the text nor the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from absl import app, flags

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


_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (holds config.json, checkpoints/).")
_PROMPT = flags.DEFINE_string("prompt", "\n", "Start of the text.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 500, "Characters to sample.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely characters.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the checkpoint of the best validation loss.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from adamw_flax import checkpoint

  workdir = Path(_WORKDIR.value)
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise app.UsageError(f"--workdir={workdir} has no config.json: not a training run directory")
  config = checkpoint.config_from_json(json.loads(config_path.read_text()))
  # Opened only to read; data_info matters to saves alone.
  with checkpoint.Checkpoints(workdir / "checkpoints", config, data_info={}) as ckpts:
    step = ckpts.best_step() if _BEST.value else _STEP.value
    step = ckpts.latest_step() if step is None else step
    if step is None:
      raise app.UsageError(f"{workdir / 'checkpoints'} holds no complete checkpoint yet")
    chars = ckpts.meta(step)["data_info"]["chars"]
  model = checkpoint.restore_params(workdir, step=step)
  print(
    sample_text(
      model,
      CharVocab(chars),
      _PROMPT.value,
      _NUM_TOKENS.value,
      seed=_SEED.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
    )
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)

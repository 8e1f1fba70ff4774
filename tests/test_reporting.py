"""Metric writers: JSON lines, the loss plot, local and object-store (rewrite) modes."""

from __future__ import annotations

import json

import pytest

from adamw_flax import fs, reporting


@pytest.mark.parametrize("remote", [False, True])
def test_metrics_writer_and_plot(tmp_path, monkeypatch, remote):
  if remote:  # the object-store path (rewrite whole files), exercised on a local dir
    monkeypatch.setattr(fs, "is_remote", lambda path: True)
  (tmp_path / "metrics.jsonl").write_text(
    json.dumps({"step": 1, "split": "train", "loss": 5.0}) + "\n"
  )
  writer = reporting.MetricsWriter(tmp_path, tensorboard=False)
  for step in (2, 3):
    writer.write(step, "train", {"loss": 4.0 / step, "lr": 1e-3 * step})
  writer.write(3, "eval", {"loss": float("nan")})
  writer.close()
  rows = reporting.read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["split"]) for r in rows] == [
    (1, "train"),
    (2, "train"),
    (3, "train"),
    (3, "eval"),
  ]
  assert rows[-1]["loss"] == "nan"  # JSON has no NaN: written as a string
  out = reporting.plot_losses(tmp_path)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not list(tmp_path.glob("*.tmp*"))


def test_read_metrics_skips_a_torn_last_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "spl'
  )
  assert [r["step"] for r in reporting.read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_as_path_keeps_remote_scheme():
  assert str(fs.as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
  assert fs.as_path("relative/dir").is_absolute()

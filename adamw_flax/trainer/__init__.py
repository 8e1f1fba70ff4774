"""The trainer: config in, trained and checkpointed model out.

``train_and_evaluate(config, workdir)`` joins the library's pieces and is the
only place with the side effects of training (files, the workdir lock, logs,
signals). Its modules, each one concern:

* :mod:`~adamw_flax.trainer.loop`: start-up in phases (claim the workdir,
  mesh, data, abstract state, restore or create, compile) and the loop;
* :mod:`~adamw_flax.trainer.actions`: the loop's side actions, each a small
  object (log, skip report, divergence, eval, save, stop, profile, plots,
  timing), and the evaluation;
* :mod:`~adamw_flax.trainer.workdir`: the lock, ``config.json``, corrupt
  checkpoints, the disk;
* :mod:`~adamw_flax.trainer.report`: the start-up report and the summary.

Workdir layout (a contract with users' scripts):
``config.json`` (the resolved config, written once the state is built or
restored), ``metrics.jsonl`` (one JSON object a logged step: ``step``,
``split``, ``loss``, ``lr``, throughput, wall time; each step once, also
across resumes), ``tensorboard/``, ``loss.png``, ``checkpoints/``,
``checkpoints.corrupt/`` (checkpoints that could not be read, moved aside,
never deleted), ``timing.json`` (the last run's fixed costs),
``stall-<process>.txt`` (stacks, after a stall), ``.alive/`` (heartbeats of
a multi-process job) and ``.lock`` (held by the running trainer).

Steps: ``state.step`` counts steps (updates applied, and updates skipped as
spikes); the data position (batches drawn) is saved beside it in every
checkpoint and restored, so a skipped non-finite update draws a new batch,
and a resumed run continues with the batch it would have drawn.
"""

from __future__ import annotations

from adamw_flax.trainer.actions import TrainingDiverged, evaluate, evaluate_all
from adamw_flax.trainer.loop import train_and_evaluate
from adamw_flax.trainer.workdir import WorkdirLock, check_workdir_config, write_workdir_config

__all__ = [
  "TrainingDiverged",
  "WorkdirLock",
  "check_workdir_config",
  "evaluate",
  "evaluate_all",
  "train_and_evaluate",
  "write_workdir_config",
]

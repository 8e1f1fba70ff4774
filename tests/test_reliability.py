"""A run never hangs and never loses work: watchdog, Ctrl-C, signals, no lockout, short first-step errors.

Every test runs ``python -m train`` as a user would, on a user's model and
data (:mod:`tests.reliability_models`), in real processes that end by
themselves (:class:`tests.jobs.Job` kills what outlives its deadline).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import time

import pytest

from adamw_flax import watchdog
from tests.jobs import Job, write_config


def _train_rows(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_stalled_input_pipeline_ends_the_run_with_stacks_and_status_75(tmp_path):
  config = write_config(tmp_path / "c.py", data__block_at=7, trainer__stall_timeout_s=4.0)
  with Job(config, tmp_path / "run", tmp_path / "logs") as job:
    (code,), (end,) = job.wait(timeout=120)
  out = job.output()
  assert code == watchdog.STALL_EXIT_CODE, out[-3000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith("error: stalled: nothing completed for "), last
  assert "in loading batch 7" in last and "stall-0.txt" in last
  stacks = (tmp_path / "run" / "stall-0.txt").read_text()
  assert "train_batch" in stacks and "reliability_models.py" in stacks  # the user's frame
  assert "Current thread" in stacks or "Thread 0x" in stacks  # all threads' Python stacks
  assert "train_batch" in out  # the stacks are in the log too


def test_ctrl_c_saves_says_so_and_exits_130_then_the_rerun_resumes(tmp_path):
  # No periodic checkpoint: without the save on Ctrl-C, every step would be lost.
  config = write_config(
    tmp_path / "c.py", data__slow_s=0.05, trainer__num_steps=400, checkpoint__every_steps=0
  )
  with Job(config, tmp_path / "run", tmp_path / "logs") as job:
    job.wait_for_step(10, timeout=120)
    job.signal(signal.SIGINT)
    (code,), _ = job.wait(timeout=60)
  out = job.output()
  assert code == watchdog.INTERRUPT_EXIT_CODE, out[-3000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out
  (line,) = [x for x in out.splitlines() if x.startswith("interrupted: saved step ")]
  saved = int(line.split()[3].rstrip(";"))
  assert line.endswith("rerun the same command to resume") and saved >= 10
  rerun = write_config(tmp_path / "c.py", data__slow_s=0.0, trainer__num_steps=400,
                       checkpoint__every_steps=0)  # fmt: skip
  with Job(rerun, tmp_path / "run", tmp_path / "logs2", args=[
    "--config.trainer.allow_config_change=True"]) as job:  # fmt: skip
    (code,), _ = job.wait(timeout=240)
  assert code == 0, job.output()[-3000:]
  assert f"resumed from step {saved} " in job.output()
  steps = [r["step"] for r in _train_rows(tmp_path / "run") if r["split"] == "train"]
  assert steps == sorted(set(steps)) and steps[-1] == 400  # each step once, across the resume


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_second_signal_ends_a_stuck_run_at_once(tmp_path, signum):
  config = write_config(tmp_path / "c.py", data__block_at=12, trainer__stall_timeout_s=0.0)
  with Job(config, tmp_path / "run", tmp_path / "logs") as job:
    job.wait_for_step(10, timeout=120)
    time.sleep(1.0)  # now blocked in the data: no step boundary comes
    job.signal(signum)
    time.sleep(1.5)
    assert job.procs[0].poll() is None  # the first one only asks for a save
    sent = time.monotonic()
    job.signal(signum)
    (code,), _ = job.wait(timeout=60)
    took = time.monotonic() - sent
  out = job.output()
  name = signal.Signals(signum).name
  assert code == 128 + signum, out[-3000:]
  assert f"{name}: saving a checkpoint at the next step boundary" in out
  assert f"{name} again: exiting at once, without saving" in out
  assert took < 20, took  # at once, not at a timeout


def test_a_loss_that_fails_at_the_first_step_is_short_and_locks_nothing(tmp_path):
  # The dataset's batches lack the key the loss reads: the user's own KeyError.
  bad = write_config(tmp_path / "bad.py", data__label_key="lbl")
  with Job(bad, tmp_path / "run", tmp_path / "logs") as job:
    (code,), _ = job.wait(timeout=120)
  out = job.output()
  assert code == 1, out[-3000:]
  err = [line for line in out.splitlines() if line.strip()][-4:]
  assert err[0] == "error: KeyError: 'label'", err
  assert "tests/reliability_models.py:" in err[1] and 'labels = batch["label"]' in err[1]
  assert err[2].startswith("  batch: features float32[16, 8], lbl int") and err[2].endswith("[16]")
  assert "--verbosity=1" in err[3] and "Traceback" not in out
  # The fixed rerun, a different config, starts: no checkpoint, so no run to protect.
  good = write_config(tmp_path / "good.py", trainer__num_steps=10)
  with Job(good, tmp_path / "run", tmp_path / "logs2") as job:
    (code,), _ = job.wait(timeout=180)
  assert code == 0, job.output()[-3000:]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["label_key"] == "label"


def test_a_batch_the_mesh_cannot_split_is_refused_at_start_up(tmp_path):
  config = write_config(tmp_path / "c.py", data__batch_size=7)
  with Job(config, tmp_path / "run", tmp_path / "logs", devices=2) as job:
    (code,), _ = job.wait(timeout=120)
  lines = [line for line in job.output().splitlines() if line.strip()]
  assert code == 2, lines
  assert lines == [
    "error: data.batch_size=7 does not split over the 2 data devices (mesh {'data': 2}, "
    "data axes ('data',)); make it a multiple of 2, e.g. 6 or 8"
  ]
  assert not (tmp_path / "run").exists()  # the refused start left nothing behind


@pytest.mark.slow
def test_two_processes_both_end_when_one_stalls_in_its_data(tmp_path):
  timeout_s = 20.0
  config = write_config(
    tmp_path / "c.py",
    data__block_at=20,
    data__block_process=1,
    trainer__stall_timeout_s=timeout_s,
    trainer__num_steps=200,
  )
  with Job(config, tmp_path / "run", tmp_path / "logs", num_processes=2, devices=2) as job:
    job.wait_for_step(15, timeout=180)
    stalled = time.monotonic() - job.started
    codes, ends = job.wait(timeout=stalled + timeout_s + 120)
  assert all(c not in (None, 0) for c in codes), (
    codes,
    job.output(0)[-2000:],
    job.output(1)[-2000:],
  )
  # Both ended within stall_timeout_s + 60 s of the stall (which began by step 20).
  assert max(ends) - stalled < timeout_s + 60, (ends, stalled)
  assert codes[1] == watchdog.STALL_EXIT_CODE
  assert "in loading batch 20" in job.output(1).strip().splitlines()[-1]
  assert (tmp_path / "run" / "stall-1.txt").exists()


# ------------------------------------------------------------------ several processes


def _two(config, workdir, logs, *, timeout, **kw):
  with Job(config, workdir, logs, num_processes=2, devices=2, **kw) as job:
    codes, ends = job.wait(timeout=timeout)
  return job, codes, ends


def _last_line(job, i):
  lines = [line for line in job.output(i).splitlines() if line.strip()]
  return lines[-1] if lines else ""


@pytest.mark.slow
def test_sigkill_of_one_process_ends_the_other_in_one_line_and_both_resume(tmp_path):
  config = write_config(tmp_path / "c.py", data__slow_s=0.05, trainer__num_steps=400)
  workdir = tmp_path / "run"
  with Job(config, workdir, tmp_path / "logs", num_processes=2, devices=2) as job:
    job.wait_for_step(25, timeout=240)  # checkpoints at 10 and 20 are on disk
    killed = time.monotonic() - job.started
    job.signal(signal.SIGKILL, 1)
    codes, ends = job.wait(timeout=killed + 120)
  assert codes[0] == watchdog.STALL_EXIT_CODE, job.output(0)[-3000:]
  assert ends[0] - killed < 60, (ends, killed)
  last = _last_line(job, 0)
  assert last.startswith("error: process 1 of 2 has shown no sign of life for "), last
  assert "Check failure" not in job.output(0)  # not JAX's abort from C++
  rerun = write_config(tmp_path / "c.py", data__slow_s=0.0, trainer__num_steps=400)
  job, codes, _ = _two(rerun, workdir, tmp_path / "logs2", timeout=400,
                       args=["--config.trainer.allow_config_change=True"])  # fmt: skip
  assert codes == [0, 0], job.output(0)[-3000:]
  resumed = re.search(r"resumed from step (\d+) ", job.output(0))
  assert resumed and int(resumed.group(1)) >= 20


@pytest.mark.slow
@pytest.mark.parametrize("to", [0, 1])
def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(tmp_path, to):
  # JAX's preemption service tells every process where to stop; the signal reaches it only
  # if the trainer forwards it (it was caught and lost: both trained to the end).
  config = write_config(tmp_path / "c.py", data__slow_s=0.05, trainer__num_steps=400,
                        checkpoint__every_steps=0)  # fmt: skip
  workdir = tmp_path / "run"
  with Job(config, workdir, tmp_path / "logs", num_processes=2, devices=2) as job:
    job.wait_for_step(10, timeout=240)
    job.signal(signal.SIGTERM, to)
    codes, _ = job.wait(timeout=120)
  assert codes == [0, 0], (job.output(0)[-3000:], job.output(1)[-3000:])
  saved = re.search(r"preempted: saved step (\d+);", job.output(0))
  assert saved and int(saved.group(1)) < 400, job.output(0)[-3000:]
  assert "SIGTERM: saving a checkpoint at the next step boundary" in job.output(to)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [saved.group(1)]


@pytest.mark.slow
def test_a_second_two_process_job_on_a_busy_workdir_is_refused_by_both(tmp_path):
  config = write_config(tmp_path / "c.py", data__slow_s=0.05, trainer__num_steps=400)
  workdir = tmp_path / "run"
  with Job(config, workdir, tmp_path / "logs_a", num_processes=2, devices=2) as first:
    first.wait_for_step(5, timeout=240)
    second, codes, _ = _two(config, workdir, tmp_path / "logs_b", timeout=180)
    assert first.procs[0].poll() is None and first.procs[1].poll() is None  # undisturbed
  assert codes == [2, 2], (second.output(0)[-2000:], second.output(1)[-2000:])
  lines = [_last_line(second, i) for i in range(2)]
  assert lines[0] == lines[1] and "is in use by another trainer" in lines[0], lines
  assert "Check failure" not in second.output(1)


@pytest.mark.slow
def test_two_processes_fall_back_together_from_a_corrupt_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  config = write_config(tmp_path / "c.py", trainer__num_steps=30)
  job, codes, _ = _two(config, workdir, tmp_path / "logs", timeout=300)
  assert codes == [0, 0], job.output(0)[-3000:]
  metadata = workdir / "checkpoints" / "30" / "state" / "_METADATA"
  if not metadata.exists():
    (metadata,) = [p for p in (workdir / "checkpoints" / "30").rglob("_METADATA")][:1]
  metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])
  more = ["--config.trainer.num_steps=40", "--config.trainer.allow_config_change=True"]
  job, codes, _ = _two(config, workdir, tmp_path / "logs2", timeout=300, args=more)
  assert codes == [0, 0], (job.output(0)[-3000:], job.output(1)[-3000:])
  assert "checkpoint 30 is unreadable" in job.output(0)
  assert "resumed from step 20, the newest readable checkpoint" in job.output(0)
  assert [p.name.split(".")[0] for p in (workdir / "checkpoints.corrupt").iterdir()] == ["30"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["batch", "config"])
def test_two_processes_end_alike_on_a_start_up_error(tmp_path, case):
  config = write_config(tmp_path / "c.py", data__batch_size=6 if case == "batch" else 16)
  per = [[], ["--config.optimizer.learning_rate=0.1"]] if case == "config" else None
  job, codes, _ = _two(config, tmp_path / "run", tmp_path / "logs", timeout=180, process_args=per)
  lines = [_last_line(job, i) for i in range(2)]
  assert codes == [2, 2], (job.output(0)[-2000:], job.output(1)[-2000:])
  assert lines[0] == lines[1], lines
  if case == "batch":
    assert lines[0].startswith("error: data.batch_size=6 does not split over the 4 data devices")
  else:
    assert "process 1 was given another config than process 0" in lines[0]
    assert "optimizer.learning_rate" in lines[0]
  assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("best", ["", pytest.param("loss", marks=pytest.mark.slow)])
def test_ctrl_c_in_the_final_evaluation_keeps_the_last_step_and_reruns_evaluate_once(
  tmp_path, best
):
  # A long final evaluation (about 10 s) and no periodic checkpoint: the last steps are only
  # in the final save. Without keep_best_by it is written before the evaluation; with it,
  # after (it records the evaluation's metrics), or at the signal.
  config = write_config(tmp_path / "c.py", data__eval_slow_s=0.05, trainer__eval_every=0,
                        trainer__final_eval_batches=200, checkpoint__every_steps=0,
                        checkpoint__keep_best_by=best)  # fmt: skip
  with Job(config, tmp_path / "run", tmp_path / "logs") as job:
    job.wait_for_step(40, timeout=120)
    time.sleep(1.0)  # in the final evaluation
    job.signal(signal.SIGINT)
    (code,), _ = job.wait(timeout=60)
  out = job.output()
  assert code == watchdog.INTERRUPT_EXIT_CODE, out[-3000:]
  assert "Traceback" not in out
  assert "interrupted: saved step 40; the final evaluation did not run" in out, out[-2000:]
  assert (tmp_path / "run" / "checkpoints" / "40").is_dir()
  assert not [r for r in _train_rows(tmp_path / "run") if r["split"] == "eval"]
  for n, log in enumerate(["logs2", "logs3"]):  # the rerun evaluates; the next has nothing to do
    with Job(config, tmp_path / "run", tmp_path / log) as job:
      (code,), _ = job.wait(timeout=120)
    out = job.output()
    assert code == 0, out[-3000:]
    assert ("trained and evaluated already" in out) == (n == 1), out[-2000:]
    (summary,) = [x for x in out.splitlines() if x.startswith("step 40: train loss ")]
    assert "nan" not in summary, summary
  evals = [r for r in _train_rows(tmp_path / "run") if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [40]  # each step's evaluation once


def test_a_state_gone_nan_is_never_checkpointed(tmp_path):
  # From batch 12 on, a NaN feature: the loss and the update are NaN from step 13; the save
  # due at step 20 is refused, and the run stops after 10 non-finite steps, naming step 10.
  config = write_config(tmp_path / "c.py", data__nan_from=12, optimizer__skip_nonfinite=False)
  with Job(config, tmp_path / "run", tmp_path / "logs") as job:
    (code,), _ = job.wait(timeout=120)
  out = job.output()
  assert code == 1, out[-3000:]
  assert "step 20: the state holds NaN or inf: not saved (the last good checkpoint (step 10)" in out
  last = out.strip().splitlines()[-1]
  assert last.startswith("error: loss was non-finite for 10 consecutive steps"), last
  assert "the last good checkpoint (step 10) is kept" in last, last
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["10"]


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"checkpoint__keep_best_by": "f1"},
     "checkpoint.keep_best_by: 'f1' is not a metric of the evaluation, which gives accuracy, loss"),
    ({"checkpoint__keep_best_by": "ema_loss"},
     "checkpoint.keep_best_by: 'ema_loss' is a metric of the EMA weights, which this run does not "
     "keep; set trainer.ema_decay"),
    ({"checkpoint__keep_best_by": "loss", "trainer__eval_batches": 0},
     "checkpoint.keep_best_by: 'loss' needs evaluations, and trainer.eval_batches and "
     "final_eval_batches are 0"),
  ],
  ids=["unknown-metric", "ema-without-ema", "no-evaluation"],
)  # fmt: skip
def test_a_keep_best_by_no_evaluation_gives_is_refused_before_training(
  tmp_path, overrides, message
):
  config = write_config(tmp_path / "c.py", **overrides)
  with Job(config, tmp_path / "run", tmp_path / "logs") as job:
    (code,), _ = job.wait(timeout=120)
  out = job.output()
  assert code == 2, out[-3000:]
  assert out.strip().splitlines()[-1].startswith("error: " + message), out[-2000:]
  assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_evaluations_of_zero_batches_are_skipped(tmp_path):
  config = write_config(tmp_path / "c.py", trainer__eval_batches=0, trainer__final_eval_batches=0)
  with Job(config, tmp_path / "run", tmp_path / "logs") as job:
    (code,), _ = job.wait(timeout=120)
  assert code == 0, job.output()[-3000:]
  rows = _train_rows(tmp_path / "run")
  assert rows[-1]["step"] == 40 and not [r for r in rows if r["split"] == "eval"]
  assert (tmp_path / "run" / "checkpoints" / "40").is_dir()


def _cpu_seconds(pid: int) -> float:
  fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _past_interpreter_start(pid: int, timeout: float) -> None:
  """Waits until ``python -m train`` runs its own code (a Ctrl-C before is Python's own).

  After its re-exec (its environment then holds the malloc settings) and
  0.5 s of CPU more: Python's start-up and site import take about 0.15 s of
  CPU here, and CPU time does not stretch with the machine's load.
  """
  deadline = time.monotonic() + timeout
  while b"MALLOC_MMAP_THRESHOLD_" not in pathlib.Path(f"/proc/{pid}/environ").read_bytes():
    assert time.monotonic() < deadline, "no re-exec"
    time.sleep(0.01)
  start = _cpu_seconds(pid)
  while _cpu_seconds(pid) < start + 0.5:
    assert time.monotonic() < deadline, "no progress"
    time.sleep(0.01)


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_at_any_moment_of_start_up_ends_it_in_one_line(tmp_path):
  # Python drops a KeyboardInterrupt raised in a callback (JAX's gc hook): such a Ctrl-C
  # used to be lost, and the run trained to the end with status 0.
  config = write_config(tmp_path / "c.py", trainer__num_steps=100000, checkpoint__every_steps=0)
  for i, delay in enumerate([0.0, 0.3, 0.6, 1.0, 1.5, 3.0]):
    with Job(config, tmp_path / f"run{i}", tmp_path / f"logs{i}") as job:
      _past_interpreter_start(job.procs[0].pid, timeout=60)
      time.sleep(delay)
      job.signal(signal.SIGINT)
      (code,), _ = job.wait(timeout=60)
    out = job.output()
    # 130, or ended by SIGINT itself, which a shell reports as 130 too: CPython does so at exit
    # when a KeyboardInterrupt crossed code that an extension ran through PyRun_String (its
    # _Py_UnhandledKeyboardInterrupt stays set, even after the exception was handled).
    assert code in (watchdog.INTERRUPT_EXIT_CODE, -signal.SIGINT), (delay, out[-3000:])
    assert "Traceback" not in out and "Exception ignored" not in out, (delay, out[-3000:])
    last = out.strip().splitlines()[-1]
    assert last == "interrupted before training started: nothing was saved" or (
      "interrupted: saved step" in out
    ), (delay, out[-2000:])

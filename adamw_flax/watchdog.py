"""Stop signals and the stall watchdog: a run never hangs and never loses work silently.

Two small pieces of the trainer's side effects, each one idea:

* :class:`StopSignals`: SIGTERM and SIGINT (Ctrl-C) ask the run to save a
  checkpoint at the next step boundary and stop; a second one exits at once.
  Python runs signal handlers only when the main thread is back in the
  interpreter, so a handler alone cannot stop a loop stuck inside a compiled
  step. The signals are therefore read by a thread from
  :func:`signal.set_wakeup_fd`, which the C-level handler writes to at the
  moment the signal arrives, whatever the main thread is doing.

  With ``jax.distributed``, JAX's preemption notifier owns SIGTERM (a C
  handler that sets a flag and swallows every later SIGTERM, so a hung job
  could only be SIGKILLed). We take the signal over and forward the first
  SIGTERM or SIGINT to that C handler, so JAX's preemption service still
  makes every process stop at the same step; the second one is ours.

* :class:`Watchdog`: when no step, evaluation batch or save completes for
  ``trainer.stall_timeout_s`` seconds, the process writes every thread's
  Python stack (:mod:`faulthandler`) to its log and to
  ``WORKDIR/stall-<process>.txt``, prints one line saying what it was doing,
  and exits with :data:`STALL_EXIT_CODE`, so an orchestrator restarts the job
  (the hang of jax#38503: a process alive but never entering a collective).
  Nothing in JAX does this: its heartbeat only notices dead processes.

* :class:`PeerWatch`: with several processes, a process that dies (SIGKILL,
  a lost host) makes the others exit within ``trainer.peer_timeout_s`` with
  one line, instead of waiting for JAX's heartbeat to abort them from C++.

Exit statuses (documented in the README): :data:`STALL_EXIT_CODE` (75,
``EX_TEMPFAIL``: retry) after a stall; ``128 + signal`` (130 for SIGINT, 143
for SIGTERM) for a second signal; 130 after a Ctrl-C that saved.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

from etils import epath

__all__ = ["INTERRUPT_EXIT_CODE", "STALL_EXIT_CODE", "PeerWatch", "StopSignals", "Watchdog"]

FIRST_STEP_MIN_S = 300.0  # the least time start-up and the first (compiling) step get
STALL_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: a temporary failure, rerun the job
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A Ctrl-C before StopSignals takes over (start-up), once seen.
_EARLY_INTERRUPT = threading.Event()


def remember_interrupts(*, seen: bool = False) -> None:
  """Until :class:`StopSignals` takes over, a Ctrl-C raises KeyboardInterrupt, and is remembered.

  Python drops a KeyboardInterrupt raised inside a callback (JAX's garbage
  collection hook prints "Exception ignored ... KeyboardInterrupt") and goes
  on: a Ctrl-C about a second after launch then trained to the end, status 0
  (2 tries of 6). Remembered, it stops the start-up where
  :meth:`StopSignals.install` runs. Call from the main thread.

  Args:
    seen: a Ctrl-C came already (before this module could be imported).
  """
  if seen:
    _EARLY_INTERRUPT.set()

  def handler(signum: int, frame: Any) -> None:
    _EARLY_INTERRUPT.set()
    signal.default_int_handler(signum, frame)

  signal.signal(signal.SIGINT, handler)


_CHandler = ctypes.CFUNCTYPE(None, ctypes.c_int)


def _foreign_handler(signum: int) -> Any:
  """The C-level handler of ``signum`` installed by native code (JAX's), or None.

  A handler set from Python is a callable to ``signal.getsignal`` (its C-level
  handler is CPython's own). Otherwise ``getsignal`` says only what CPython
  last knew: ``SIG_DFL`` still after ``jax.distributed.initialize`` installed
  the preemption notifier's handler in C, so every multi-process stop signal
  was lost (caught, never forwarded); CPython's ``PyOS_getsig`` (public C
  API) gives the handler actually installed.
  """
  if callable(signal.getsignal(signum)):
    return None
  getsig = ctypes.pythonapi.PyOS_getsig
  getsig.restype, getsig.argtypes = ctypes.c_void_p, [ctypes.c_int]
  address = getsig(signum)
  if not address or address in (int(signal.SIG_DFL), int(signal.SIG_IGN)):
    return None
  return _CHandler(address)


class StopSignals:
  """SIGTERM / SIGINT as "save and stop at the next step boundary"; the second exits at once.

  Install from the main thread (:meth:`install`, or use it as a context
  manager); off the main thread it does nothing and says so.

  Attributes:
    received: the first signal's number, or None.
  """

  def __init__(self, *, announce: bool = True) -> None:
    self.received: int | None = None
    self._event = threading.Event()
    self._count = 0
    self._lock = threading.Lock()
    self._announce = announce
    self._previous: dict[int, Any] = {}
    self._forward: Any = None
    self._wakeup_old = -1
    self._sockets: tuple[socket.socket, socket.socket] | None = None
    self._thread: threading.Thread | None = None

  def __enter__(self) -> StopSignals:
    self.install()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.uninstall()

  def is_set(self) -> bool:
    """Whether a stop was asked for."""
    return self._event.is_set()

  @property
  def name(self) -> str:
    """``"SIGTERM"`` or ``"SIGINT"`` (the first signal), or ``""``."""
    return signal.Signals(self.received).name if self.received else ""

  def install(self) -> None:
    """Takes over SIGTERM and SIGINT (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
      print("trainer runs off the main thread: SIGTERM and Ctrl-C will not save", file=sys.stderr)
      return
    if _EARLY_INTERRUPT.is_set():  # a Ctrl-C during start-up that Python dropped
      raise KeyboardInterrupt
    # JAX's preemption notifier listens on SIGTERM only; a Ctrl-C is forwarded there too.
    self._forward = _foreign_handler(signal.SIGTERM)
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    self._sockets = (reader, writer)
    self._wakeup_old = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    for signum in _SIGNALS:
      # The Python-level handler does nothing: the thread below has acted already.
      self._previous[signum] = signal.signal(signum, lambda *_: None)
    self._thread = threading.Thread(target=self._listen, name="stop-signals", daemon=True)
    self._thread.start()

  def uninstall(self) -> None:
    """Gives the signals back (main thread only)."""
    if self._sockets is None or threading.current_thread() is not threading.main_thread():
      return
    signal.set_wakeup_fd(self._wakeup_old)
    for signum, previous in self._previous.items():
      # A handler set by native code cannot be reinstalled from Python: the
      # default action then (SIGTERM ends the process, SIGINT raises).
      if previous is None:
        previous = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
      signal.signal(signum, previous)
    self._previous.clear()
    for s in self._sockets:
      s.close()
    self._sockets = None

  def _listen(self) -> None:
    reader = self._sockets[0]
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in _SIGNALS:
          self._on_signal(signum)

  def _on_signal(self, signum: int) -> None:
    with self._lock:
      self._count += 1
      first = self._count == 1
      if first:
        self.received = signum
    name = signal.Signals(signum).name
    if not first:
      print(f"\n{name} again: exiting at once, without saving", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    if self._announce:
      print(
        f"\n{name}: saving a checkpoint at the next step boundary, then stopping "
        f"(send it again to exit at once)",
        file=sys.stderr,
        flush=True,
      )
    self._event.set()
    if self._forward is not None:
      self._forward(signal.SIGTERM)  # JAX's preemption service: every process stops together


class Watchdog:
  """Turns a stalled run into stacks, one line and a non-zero exit.

  The loop calls :meth:`beat` whenever something completes (a step, an
  evaluation batch, a save) and names what it does next; a thread checks the
  time since the last beat. Start-up and the first step (which compiles) get
  ``first_factor`` times the timeout, and at least :data:`FIRST_STEP_MIN_S`.

  Args:
    timeout_s: seconds without progress before the process exits (0: off).
    workdir: where ``stall-<process>.txt`` goes.
    process_index: this process's index (``jax.process_index()``).
    first_factor: the timeout's multiple until the first :meth:`beat` with ``first=False``.
  """

  def __init__(
    self, timeout_s: float, workdir: Any, process_index: int = 0, *, first_factor: float = 2.0
  ) -> None:
    self.timeout_s = float(timeout_s)
    self.workdir = epath.Path(workdir)
    self.process_index = int(process_index)
    self._factor = float(first_factor)
    self._last = time.monotonic()
    self._doing = "start-up"
    self._done = "nothing yet"
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> Watchdog:
    self.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def start(self) -> None:
    """Starts watching (a daemon thread); a no-op with ``timeout_s == 0``."""
    if self.timeout_s <= 0 or self._thread is not None:
      return
    self._last = time.monotonic()
    self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
    self._thread.start()

  def close(self) -> None:
    """Stops watching."""
    self._stop.set()

  def beat(self, done: str | None, doing: str, *, first: bool | None = None) -> None:
    """Records progress: ``done`` completed (None: nothing), ``doing`` starts now.

    Args:
      done: what just completed (``"step 20"``), or None when only the activity changes.
      doing: what the process does next (``"train step 21"``).
      first: still in start-up or the first step (longer timeout); None keeps the current mode.
    """
    if done is not None:
      self._done = done
      self._last = time.monotonic()
    self._doing = doing
    if first is not None:
      self._factor = self._factor if first else 1.0

  def _watch(self) -> None:
    poll = min(5.0, max(self.timeout_s / 10, 0.05))
    while not self._stop.wait(poll):
      budget = self.timeout_s
      if self._factor != 1.0:  # start-up and the first step, which compiles: longer, >= 5 min
        budget = max(self.timeout_s * self._factor, FIRST_STEP_MIN_S)
      idle = time.monotonic() - self._last
      if idle > budget:
        self._fire(idle, budget)

  def _fire(self, idle: float, budget: float) -> None:
    path = self.workdir / f"stall-{self.process_index}.txt"
    header = (
      f"process {self.process_index} stalled: nothing completed for {idle:.0f} s "
      f"(limit {budget:.0f} s) while in {self._doing}; last completed: {self._done}\n"
    )
    written = str(path)
    try:
      # faulthandler writes to a real file descriptor; the workdir may be an object store.
      with tempfile.TemporaryFile("w+") as tmp:
        tmp.write(header + "\n")
        tmp.flush()
        faulthandler.dump_traceback(tmp, all_threads=True)
        tmp.seek(0)
        path.write_text(tmp.read())
    except Exception as e:  # noqa: BLE001 (a full disk must not stop the exit)
      written = f"(not written: {e})"
    with contextlib.suppress(Exception):
      faulthandler.dump_traceback(sys.stderr, all_threads=True)
    print(
      f"error: stalled: nothing completed for {idle:.0f} s (trainer.stall_timeout_s="
      f"{self.timeout_s:g}) in {self._doing}, after {self._done}; stacks in {written}; "
      f"exiting with status {STALL_EXIT_CODE} so the job can be restarted",
      file=sys.stderr,
      flush=True,
    )
    os._exit(STALL_EXIT_CODE)


class PeerWatch:
  """Several processes: exit (one line, :data:`STALL_EXIT_CODE`) when another one has died.

  When a process dies (SIGKILL, a lost host), the others wait in their next
  collective until JAX's coordination service misses its heartbeats (100 s by
  default) and aborts them from C++ with a page of log. Here each process
  writes a heartbeat file, ``WORKDIR/.alive/<process>``, every few seconds
  from a thread, and reads the others': one whose file has not changed for
  ``timeout_s`` (measured on this process's clock, so the hosts' clocks need
  not agree) is taken for dead, and this process prints one line and exits so
  the job can be restarted. A process that finishes writes ``done`` and is not
  watched any more. The workdir is shared by all processes already (Orbax
  needs it), so the files need nothing else.

  Args:
    workdir: the run's directory.
    process_index: this process.
    process_count: processes in the job (1: nothing to watch).
    timeout_s: seconds without a sign of life (0: off).
  """

  def __init__(self, workdir: Any, process_index: int, process_count: int, timeout_s: float):
    self.root = epath.Path(workdir) / ".alive"
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.timeout_s = float(timeout_s)
    self.note = ""  # e.g. "the last checkpoint is step 20", for the exit line
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._seen: dict[int, tuple[str, float]] = {}

  def __enter__(self) -> PeerWatch:
    self.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  @property
  def enabled(self) -> bool:
    return self.process_count > 1 and self.timeout_s > 0

  def start(self) -> None:
    """Writes the first heartbeat and starts the thread (a no-op for one process)."""
    if not self.enabled or self._thread is not None:
      return
    self.root.mkdir(parents=True, exist_ok=True)
    self._started = time.monotonic()
    self._write(f"{time.time():.3f} pid {os.getpid()}")
    self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
    self._thread.start()

  def close(self) -> None:
    """Stops watching and tells the others this process is done."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join(timeout=10)
    with contextlib.suppress(OSError):
      self._write("done")

  def _write(self, text: str) -> None:
    (self.root / str(self.process_index)).write_text(text)

  def _watch(self) -> None:
    interval = min(5.0, max(self.timeout_s / 6, 0.2))
    while not self._stop.wait(interval):
      now = time.monotonic()
      with contextlib.suppress(OSError):
        self._write(f"{time.time():.3f} pid {os.getpid()}")
      for peer in range(self.process_count):
        if peer == self.process_index:
          continue
        try:
          text = (self.root / str(peer)).read_text()
        except OSError:
          text = ""
        if text == "done":
          continue
        last_text, since = self._seen.get(peer, ("", self._started))
        if text != last_text:
          self._seen[peer] = (text, now)
        elif now - since > self.timeout_s:
          self._fire(peer, now - since)

  def _fire(self, peer: int, silent: float) -> None:
    note = f"; {self.note}" if self.note else ""
    print(
      f"error: process {peer} of {self.process_count} has shown no sign of life for "
      f"{silent:.0f} s (it died, or its host is gone); exiting with status {STALL_EXIT_CODE} "
      f"so the job can be restarted: rerun every process, they resume from the last "
      f"checkpoint{note}",
      file=sys.stderr,
      flush=True,
    )
    os._exit(STALL_EXIT_CODE)

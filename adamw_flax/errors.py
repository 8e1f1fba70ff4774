"""The errors a user can fix: bad config, workdir, data path or checkpoint.

The command line (``python -m train``) prints a :class:`UserError` as one to
three lines and exits with status 2, without a traceback unless
``--verbosity`` is given; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
  """An error in what the user gave (config, command line, workdir, data, checkpoint)."""


class WorkdirError(UserError):
  """A workdir that cannot be used: a file, read-only, or locked by another run."""

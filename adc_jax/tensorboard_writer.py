"""TensorBoard event files of a run's metrics, written without TensorFlow (tensorboardX).

:class:`adc_jax.train.MetricsWriter` forwards every row of ``metrics.jsonl`` here; each number
in it except ``step`` becomes a scalar of the same name at that step (``loss``,
``train_accuracy``, ``test_accuracy``, ``bytes_up``, ``steps_per_second``, ...), in event files
beside ``metrics.jsonl``, so ``tensorboard --logdir runs/`` draws the curves while runs go on
(one run per workdir). Optional: it needs ``tensorboardX`` (``pip install 'adc-jax[tensorboard]'``).
The config field ``tensorboard`` (default ``True``) writes them whenever the package is installed
and skips them silently when it is not; ``--config.tensorboard=False`` turns them off.
"""

from __future__ import annotations

import numbers
import os
from typing import Any


class TensorBoardWriter:
    """Scalars of metric rows in ``logdir``'s event files.

    Args:
      logdir: the run's workdir.
      start_step: the step a resumed run starts from. TensorBoard hides the events of later steps
        that the interrupted run wrote (its rows of ``metrics.jsonl`` are dropped the same way).
      flush_secs: how often queued events reach the file.
    """

    def __init__(self, logdir: str | os.PathLike, start_step: int = 0, flush_secs: int = 10):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(
            os.fspath(logdir), purge_step=start_step + 1, flush_secs=flush_secs
        )

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        self._writer.close()


def open_writer(workdir: str | os.PathLike, start_step: int = 0) -> TensorBoardWriter | None:
    """A :class:`TensorBoardWriter` for ``workdir``, or ``None`` when tensorboardX is missing."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return None
    return TensorBoardWriter(workdir, start_step)

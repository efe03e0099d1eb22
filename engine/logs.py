"""What a run reports while it trains: metrics.jsonl and accelerate's trackers, and the progress bar."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator

from core.atomic import write_text
from core.errors import ConfigError, RunStopped

# --report_to names -> the package each tracker needs (accelerate silently drops a tracker whose
# package is missing; we refuse instead, naming the package).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def trackers(report_to: str) -> list[str]:
    """--report_to -> accelerate's log_with names; a tracker whose package is missing is a ConfigError."""
    names = [n.strip() for n in report_to.replace(",", " ").split() if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [n for n, pkg in TRACKER_PACKAGES.items() if importlib.util.find_spec(pkg) is not None]
    for n in names:
        if n not in TRACKER_PACKAGES:
            raise ConfigError(f"--report_to {n!r}: expected tensorboard, wandb, mlflow, all or none")
        if importlib.util.find_spec(TRACKER_PACKAGES[n]) is None:
            raise ConfigError(f"--report_to {n}: the package '{TRACKER_PACKAGES[n]}' is not installed "
                              f"(pip install {TRACKER_PACKAGES[n]}, or --report_to none)")
    return names


class RunLogger:
    """Scalars to `metrics.jsonl` and to accelerate's trackers (TensorBoard by default), main process only."""

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if accelerator.log_with:
            accelerator.init_trackers("tensorboard")  # TensorBoard writes under <output_dir>/tensorboard

    def log(self, step: int, scalars: dict[str, float], **extra: Any) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        if self.enabled:
            row = {"step": step, "time": round(time.time(), 3), **scalars, **extra}
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:  # a full disk: one line, not a traceback; a torn row is dropped on resume
                raise RunStopped(f"{self.path}: could not append step {step}'s row ({e.strerror or e}); free "
                                 "some space, then continue with --resume auto") from None
        self.accelerator.log(scalars, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log has no duplicate steps; at step 0 (a
        run that starts afresh) drop them all, so two runs never share one log."""
        self.keep_rows(lambda row: row["step"] <= step)

    def keep_rows(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite metrics.jsonl (atomically) with the rows that `keep` accepts. A torn last line (the
        process died while appending it) is dropped too: it was never a whole row."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in map(_parse_row, self.path.read_text().splitlines()) if r is not None and keep(r)]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        # Not accelerator.end_training(): that also destroys the process group, which the run still needs.
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)

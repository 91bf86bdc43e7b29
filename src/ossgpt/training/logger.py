"""What a run records, on rank 0 only: train.log, metrics.jsonl, loss.png and the console.

    RUN_DIR/train.log       a header (code version, torch, machine, run), then every message and logged step
    RUN_DIR/metrics.jsonl   one JSON object per logged step {"step", "tokens", "loss", "lm_loss", ...} and per
                            evaluation {"step", "tokens", "val_loss", "val_ppl", "val_bpb"}
    RUN_DIR/loss.png        training and validation loss against tokens seen, redrawn at every evaluation

On a terminal, a tqdm progress bar shows the loss, tokens/s and the ETA; elsewhere (a file, CI) each logged step is a
plain line on stderr. A resumed run appends, after dropping the rows of steps its checkpoint had not reached.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from ossgpt import __version__
from ossgpt.checkpoint.run_dir import LOG, METRICS, PLOT


class RunLogger:
    """Records of a run in `run_dir`; with run_dir=None (ranks other than 0) every method does nothing.

    resume_step: None for a new run (records start empty), else the step of the checkpoint being resumed.
    """

    def __init__(self, run_dir: Path | None, total_steps: int, resume_step: int | None = None):
        self.enabled = run_dir is not None
        self.train_points: list[tuple[int, float]] = []  # (tokens, training lm loss), for the plot
        self.val_points: list[tuple[int, float]] = []
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path, self.plot_path = run_dir / METRICS, run_dir / PLOT
        rows = _read_rows(self.metrics_path) if resume_step is not None else []
        kept = [row for row in rows if row.get("step", math.inf) <= resume_step] if rows else []
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        if resume_step is None:
            self.plot_path.unlink(missing_ok=True)  # a previous run's
        for row in kept:
            self._remember(row)
        self.log_file = open(run_dir / LOG, "a" if resume_step is not None else "w")  # noqa: SIM115
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        """A line for train.log and the console."""
        if not self.enabled:
            return
        self._write_log(message)
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def advance(self, loss: float, tokens_per_sec: float | None) -> None:
        """One more step done (moves the progress bar)."""
        if self.enabled and self.bar is not None:
            postfix = {"loss": f"{loss:.4f}"} | ({"tok/s": f"{tokens_per_sec:,.0f}"} if tokens_per_sec else {})
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update()

    def log_step(self, row: dict, total_steps: int) -> None:
        """A training metrics row: metrics.jsonl, train.log, and a console line unless a progress bar shows it."""
        if not self.enabled:
            return
        self._append(row)
        line = (
            f"step {row['step']}/{total_steps} | loss {row['loss']:.4f} (lm {row['lm_loss']:.4f}, aux "
            f"{row['aux_loss']:.4f}) | lr {row['lr']:.2e} | grad norm {row['grad_norm']:.3f} | "
            f"{row['tokens_per_sec']:,.0f} tok/s"
        )
        self._write_log(line)
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)

    def log_eval(self, row: dict) -> None:
        """An evaluation row: metrics.jsonl, a message, and loss.png redrawn."""
        if not self.enabled:
            return
        self._append(row)
        bpb = f" | {row['val_bpb']:.4f} bits/byte" if row.get("val_bpb") is not None else ""
        self.info(f"eval at step {row['step']}: val loss {row['val_loss']:.4f} | perplexity {row['val_ppl']:.2f}{bpb}")
        self._plot()

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.log_file.close()

    # ------------------------------------------------------------------------------------------------------------
    def _write_log(self, message: str) -> None:
        self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self.log_file.flush()

    def _append(self, row: dict) -> None:
        row = {key: _finite_or_none(value) for key, value in row.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._remember(row)

    def _remember(self, row: dict) -> None:
        if row.get("lm_loss") is not None:
            self.train_points.append((row["tokens"], row["lm_loss"]))
        if row.get("val_loss") is not None:
            self.val_points.append((row["tokens"], row["val_loss"]))

    def _plot(self) -> None:
        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)  # render with Agg: no pyplot, no display
        ax = fig.add_subplot()
        for points, label, style in ((self.train_points, "train", "-"), (self.val_points, "validation", "o-")):
            if points:
                tokens, loss = zip(*points)
                ax.plot(tokens, loss, style, lw=1, ms=3, label=label)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("next-token loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.plot_path.with_name(f".{PLOT}.tmp")
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, self.plot_path)  # a viewer never sees a half-written image


def _read_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows; a torn last line (a killed run) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _finite_or_none(value):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------------
def environment_lines() -> list[str]:
    """Where and with what a run ran: code version, torch, machine."""
    commit = _git_commit()
    lines = [
        f"ossgpt {__version__}" + (f" (git {commit})" if commit else ""),
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"machine: {platform.node()}, {_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"GPUs: {', '.join(names)} (CUDA {torch.version.cuda})")
    return lines


def _git_commit() -> str | None:
    """The commit of the ossgpt source tree, with "+dirty" if it has uncommitted changes; None outside git."""
    source = Path(__file__).resolve().parents[1]  # the ossgpt package
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True, text=True,
                              timeout=5)  # fmt: skip
        if head.returncode:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                capture_output=True, text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

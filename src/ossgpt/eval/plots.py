"""Plots of an EvalResult, written as PNG files with matplotlib's Agg renderer (no display needed).

loss_by_position.png   mean loss against tokens of context (position in the window + 1), log x
expert_load.png        layer x expert heatmap of each expert's share of the routed tokens
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from ossgpt.eval.metrics import EvalResult

ANNOTATE_MAX_CELLS = 256  # write each share into its cell only while the cells are large enough to read


def plot_loss_by_position(result: EvalResult, path: str | Path) -> None:
    """Mean loss at each window position: how much a longer context helps the model."""
    loss = np.asarray(result.loss_by_position)
    context = np.arange(1, len(loss) + 1)
    known = ~np.isnan(loss)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot(context[known], loss[known], lw=1, label="mean at position")
    ax.axhline(result.loss, color="gray", ls="--", lw=1, label=f"overall {result.loss:.3f}")
    if len(loss) > 1:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 10, 100 rather than 10^0, 10^1, 10^2
    ax.set_xlabel("tokens of context (position in window + 1)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"loss by position ({result.n_tokens:,} tokens, windows of {result.seq_len})")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_expert_load(result: EvalResult, path: str | Path) -> None:
    """Heatmap of load fractions, layer x expert, centred (white) on the uniform share 1/E."""
    load = np.array([layer.fractions for layer in result.expert_load])  # [layers, E]
    n_layers, n_experts = load.shape
    uniform = 1 / n_experts
    fig = Figure(figsize=(max(5.0, 0.5 * n_experts + 2.5), max(3.0, 0.45 * n_layers + 1.5)))
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(load.max(), 2 * uniform))
    image = ax.imshow(load, cmap="coolwarm", norm=norm, aspect="auto")
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    if load.size <= ANNOTATE_MAX_CELLS:
        for (layer, expert), share in np.ndenumerate(load):
            ax.text(expert, layer, f"{share:.2f}", ha="center", va="center", fontsize=8)
    cvs = [f"{layer.cv:.2f}" for layer in result.expert_load]
    ax.set_yticks(range(n_layers), [f"{i} (CV {cv})" for i, cv in enumerate(cvs)])
    if n_experts <= 32:  # one tick per expert while they fit
        ax.set_xticks(range(n_experts))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert load (uniform 1/{n_experts} = {uniform:.3f}; dropless)")
    _save(fig, path)


def _save(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)  # attach the Agg canvas: render without pyplot or a display
    fig.tight_layout()
    fig.savefig(path, dpi=120)

"""Training plots: loss curves and tokens per expert over time (PNG, matplotlib Agg)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flyer.data.shards import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    """Write ``fig`` as PNG so that a run stopped meanwhile leaves the old plot or the new one, never a torn file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, [buf.getvalue()])


def plot_loss(records: list[dict], path: Path, unigram: float | None = None) -> None:
    # the main next-token loss, comparable with validation (the total adds the weighted MTP loss)
    train = [(r["step"], r.get("main_loss", r["loss"])) for r in records
             if r.get("loss") is not None and not r.get("skipped")]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and r["val_loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=1, alpha=0.8, label="train loss (next token)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", lw=1.5, label="validation loss")
    if unigram is not None:
        ax.axhline(unigram, ls="--", c="gray", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_expert_load(records: list[dict], path: Path, n_mtp: int = 0) -> None:
    """Heat map of each MoE layer's share of routed tokens per expert, step by step."""
    rows = [(r["step"], r["expert_load"]) for r in records if r.get("expert_load")]
    if not rows:
        return
    steps = [s for s, _ in rows]
    loads = np.array([load for _, load in rows], dtype=float)  # (steps, layers, experts)
    n_layers = loads.shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(2.6 * n_layers + 1.5, 3.6), squeeze=False, layout="constrained")
    for li, ax in enumerate(axes[0]):
        share = loads[:, li, :] / np.maximum(loads[:, li, :].mean(axis=1, keepdims=True), 1e-9)
        im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=max(2.0, share.max()),
                       extent=[steps[0], steps[-1], -0.5, share.shape[1] - 0.5])
        ax.set_title(f"MoE layer {li}" if li < n_layers - n_mtp else f"MTP MoE {li - (n_layers - n_mtp) + 1}")
        ax.set_xlabel("step")
        if li == 0:
            ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes[0].tolist(), label="tokens / mean tokens per expert")
    _save(fig, path)

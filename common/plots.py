"""Plots every train.py writes beside its metrics.json."""

from __future__ import annotations

from pathlib import Path


def plot_losses(log_history: list[dict], path: Path, title: str = "") -> None:
    """The logged training loss and every evaluation loss (`eval_loss`, `eval_<set>_loss`) per
    step, from a Trainer's `state.log_history`, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_keys = sorted({k for h in log_history for k in h if k.startswith("eval_") and k.endswith("loss")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ["loss", *eval_keys]:
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:  # eval_loss -> "valid", eval_news_loss -> "news"
            label = key.removeprefix("eval_").removesuffix("loss").rstrip("_") or "valid"
            ax.plot(*zip(*points), marker=None if key == "loss" else "o", markersize=3,
                    label="train (logged)" if key == "loss" else label)
    ax.set(xlabel="optimizer step", ylabel="loss", title=title or "loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

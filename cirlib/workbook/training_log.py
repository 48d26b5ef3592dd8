"""A run's training log (`metrics.jsonl`) as a table and as a figure (notebooks 01 and 03)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from cirlib.run_folder import RunFolder
from cirlib.train.metrics_log import read_metrics

# ------------------------------------------------------------------------------------------------ training log


def read_training_log(run_dir: str | Path) -> pd.DataFrame:
    """The run's `metrics.jsonl` as a table (one row per record; column "kind" is train / epoch / val), read by the
    training loop's own reader; an untrained run gives an empty table.

    Args:
        run_dir: a run folder written by `steps.train_stage1` / `train_stage2`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: train the run first")
    if not RunFolder.at(run_dir).log_file.is_file():
        return pd.DataFrame(columns=["kind", "epoch", "step"])
    return pd.DataFrame.from_records(read_metrics(run_dir))


def plot_training_log(run_dir: str | Path) -> Figure:
    """Training loss (per logged step and per epoch), learning rate, and validation metrics of one run.

    A run trained for 0 epochs has no log; the figure then says so instead of plotting.

    Args:
        run_dir: a run folder written by `steps.train_stage1` / `train_stage2`.
    """
    log = read_training_log(run_dir)
    kinds = log["kind"] if "kind" in log else pd.Series("train", index=log.index)
    train, epochs, val = log[kinds == "train"], log[kinds == "epoch"], log[kinds == "val"]
    val_keys = [c for c in log.columns if c.startswith("val/") and val[c].notna().any()]
    # a third panel only when there is validation to show (validate_every=0 runs have none)
    fig = Figure(figsize=(11 if val_keys else 7.5, 3.2), layout="constrained")
    axes = fig.subplots(1, 3 if val_keys else 2)
    ax_loss, ax_lr = axes[0], axes[1]
    fig.suptitle(f"training log of {Path(run_dir).name}", fontsize=10)
    if log.empty:
        for ax in axes:
            ax.axis("off")
        ax_lr.text(0.5, 0.5, "no metrics.jsonl: this run was not trained (epochs=0)", ha="center", va="center")
        return fig
    loss_keys = [c for c in log.columns if c == "loss" or c.endswith("_loss")]
    for key in loss_keys:
        if key in train and train[key].notna().any():
            ax_loss.plot(train["step"], train[key], linewidth=1, label=f"{key} (steps)")
        if key in epochs and epochs[key].notna().any():
            ax_loss.plot(epochs["step"], epochs[key], "o--", markersize=4, label=f"{key} (epoch mean)")
    ax_loss.set_xlabel("optimiser step")
    ax_loss.set_title("loss", fontsize=9)
    ax_loss.legend(fontsize=7)
    lr_rows = pd.concat([train, epochs]).sort_values("step") if "lr" in log else log.iloc[:0]
    if not lr_rows.empty:
        ax_lr.plot(lr_rows["step"], lr_rows["lr"], ".-", linewidth=1)
    ax_lr.set_xlabel("optimiser step")
    ax_lr.set_title("learning rate", fontsize=9)
    if val_keys:
        ax_val = axes[2]
        for key in val_keys:
            ax_val.plot(val["epoch"], val[key], "o-", markersize=3, linewidth=1, label=key.removeprefix("val/"))
        ax_val.set_xlabel("epoch")
        ax_val.set_title("validation", fontsize=9)
        ax_val.legend(fontsize=6, ncol=2)
    return fig

"""The global model seen from the server's side: a DeviceModel that applies each aggregated
round's delta exactly as devices do, for held-out evaluation, plus the round plot."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


from .methods import JobConfig, get_method
from .protocol import RoundDelta

__all__ = ["GlobalModel", "plot_rounds"]


class GlobalModel:
    def __init__(self, model, job: JobConfig):
        self.model = model
        self.job = job
        self.client = get_method(job.method).client()
        self.params = {**job.params, "k": job.k, "seed_pool_id": job.seed_pool_id,
                       "dist": job.params.get("dist", "normal")}
        self.rounds_applied = 0

    def apply(self, delta: RoundDelta) -> None:
        """The delta of the next aggregated round (in order)."""
        if delta.round != self.rounds_applied:
            raise ValueError(f"delta of round {delta.round} but the model is at round {self.rounds_applied}")
        self.client.apply_delta(self.model, delta, self.params)
        self.rounds_applied += 1

    def evaluate(self, records: Sequence, batch_size: int = 32, **kw) -> dict:
        """The task's metrics on held-out records (see DeviceModel.evaluate)."""
        return self.model.evaluate(records, batch_size=batch_size, **kw)


def plot_rounds(history: list[dict], path: str | Path, title: str) -> Path:
    """The held-out primary metric (accuracy, preference accuracy or loss) and loss, and devices'
    training loss, over rounds. Each history entry
    describes the global state after `round` aggregated rounds (0 = before training)."""
    from .plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        raise ImportError("plotting the rounds needs matplotlib (a host extra): pip install matplotlib")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ev = [h for h in history if h.get("eval_metric") is not None]
    metric = next((h["metric"] for h in ev if h.get("metric")), "accuracy")
    pct = metric != "loss"
    if ev:
        ax1.plot([h["round"] for h in ev], [(100 if pct else 1) * h["eval_metric"] for h in ev], "o-",
                 color="tab:blue")
    ax1.set_xlabel("rounds aggregated (0 = before training)")
    n = next((h.get("eval_n") for h in ev if h.get("eval_n")), None)
    ax1.set_ylabel(f"held-out {metric.replace('_', ' ')}{' (%)' if pct else ''}{f', {n} rows' if n else ''}")
    ax1.set_title(metric.replace("_", " "))
    ax1.grid(alpha=0.3)
    tr = [h for h in history if h.get("train_loss") is not None]
    if tr:
        ax2.plot([h["round"] for h in tr], [h["train_loss"] for h in tr], "s-", color="tab:orange",
                 label="devices' train loss (round mean)")
    if ev:
        ax2.plot([h["round"] for h in ev], [h["eval_loss"] for h in ev], "o-", color="tab:blue",
                 label="held-out loss")
    ax2.set_xlabel("rounds aggregated")
    ax2.set_ylabel("cross-entropy")
    ax2.set_title("loss")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle(title)
    return save(fig, path)

"""split.json + split.png: what each device got, so a skewed or broken split is seen at once."""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from .labels import label_set
from .records import Example

__all__ = ["write_split_report"]

log = logging.getLogger(__name__)


def _hist(records: Sequence, labels: list[str]) -> dict[str, int] | None:
    if not labels or not all(isinstance(e, Example) for e in records):
        return None  # unlabelled records (SFT, DPO, kind "lm"): sizes only
    c = Counter(e.label for e in records)
    return {lab: c.get(lab, 0) for lab in labels + sorted(set(c) - set(labels))}


def write_split_report(dir: str | os.PathLike, shards: Sequence[Sequence], heldout: Sequence = (),
                       labels: Sequence[str] | None = None, *,
                       settings: Mapping[str, Any] | None = None) -> Path:
    """Write dir/split.json (per device: size and label histogram; held-out histogram; the
    settings) and dir/split.png (per-device label bars; skipped if matplotlib is missing).
    Returns the split.json path. Histograms are omitted for unlabelled records (SFT, DPO)."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    all_ex = [e for s in shards for e in s] + list(heldout)
    labs = list(labels) if labels is not None else (
        label_set(all_ex) if all(isinstance(e, Example) for e in all_ex) else [])
    labs = [] if labs == [""] else labs
    devices = []
    for i, s in enumerate(shards):
        d: dict[str, Any] = {"device": i, "n": len(s)}
        h = _hist(s, labs)
        if h is not None:
            d["labels"] = h
        devices.append(d)
    report = {
        "settings": dict(settings or {}),
        "labels": labs,
        "n_devices": len(shards),
        "n_train": sum(len(s) for s in shards),
        "devices": devices,
        "heldout": {"n": len(heldout), **({"labels": h} if (h := _hist(heldout, labs)) is not None else {})},
    }
    path = out / "split.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _plot(out / "split.png", devices, labs)
    return path


def _plot(path: Path, devices: list[dict], labels: list[str]) -> None:
    from ..plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        log.info("matplotlib not installed: skipping %s", path)
        return
    fig, ax = plt.subplots(figsize=(min(20.0, max(4.0, 0.4 * len(devices) + 3)), 3.5))
    x = list(range(len(devices)))
    if labels and all("labels" in d for d in devices):
        cmap = plt.get_cmap("tab20" if len(labels) <= 20 else "viridis")
        bottom = [0] * len(devices)
        for k, lab in enumerate(labels):
            h = [d["labels"].get(lab, 0) for d in devices]
            color = cmap(k) if len(labels) <= 20 else cmap(k / max(1, len(labels) - 1))
            ax.bar(x, h, bottom=bottom, label=lab, color=color)
            bottom = [b + v for b, v in zip(bottom, h)]
        if len(labels) <= 20:
            ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5),
                      ncol=1 if len(labels) <= 10 else 2)
    else:
        ax.bar(x, [d["n"] for d in devices])
    ax.set_xlabel("device")
    ax.set_ylabel("examples")
    ax.set_title("examples per device" + (" by label" if labels else ""))
    ax.set_xticks(x if len(x) <= 40 else x[::max(1, len(x) // 20)])
    save(fig, path, dpi=100, tight="bbox")  # "bbox" keeps the outside legend

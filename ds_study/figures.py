"""Figures, made only from result files (CSV/JSON), never from model runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, out: Path, formats=("png",)) -> list[Path]:
    paths = []
    for fmt in formats:
        p = Path(out).with_suffix(f".{fmt}")
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths


def plot_deviation(csv_path: Path, out: Path, title: str = "", formats=("png",)) -> list[Path]:
    """Per-layer relative L2 deviation of K/V/E (p25-p75 band) and attention-output cosine."""
    import pandas as pd

    df = pd.read_csv(csv_path)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for col, color in (("k_dev", "C0"), ("v_dev", "C1"), ("e_dev", "C2")):
        ax.plot(df.layer, df[col], marker="o", color=color, label=col.replace("_dev", ""))
        ax.fill_between(df.layer, df[f"{col}_p25"], df[f"{col}_p75"], color=color, alpha=0.2)
    ax.set_ylabel("relative L2, sender vs receiver")
    ax.legend()
    ax.set_title(title or "Per-layer deviation")
    ax2.plot(df.layer, df.attn_cos, marker="s", color="C3")
    ax2.fill_between(df.layer, df.attn_cos_p25, df.attn_cos_p75, color="C3", alpha=0.2)
    ax2.set_ylabel("attention-output cosine\n(own KV vs sender KV)")
    ax2.set_xlabel("layer")
    return save(fig, out, formats)

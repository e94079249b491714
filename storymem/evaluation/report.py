"""The evaluation report: a plain-text table, the JSON file and a shot x shot similarity chart, written
atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from storymem.atomic import atomic_write

__all__ = ["METRIC_LABELS", "format_report", "plot_similarity", "write_report"]


METRIC_LABELS = {
    "aesthetic_quality": "Aesthetic quality",
    "prompt_following_global": "Prompt following (global)",
    "prompt_following_single_shot": "Prompt following (single-shot)",
    "cross_shot_consistency": "Cross-shot consistency (all pairs)",
    "cross_shot_consistency_top_k": "Cross-shot consistency (top-{k})",
}


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (metrics, then one row per shot)."""
    k = report["settings"]["top_k"]
    lines = [
        f"Story: {report['story']['name']} ({report['story']['shots']} shots)  {report['out_dir']}",
        f"Video-text encoder: {report['encoders']['video_text']}",
        f"Aesthetic scorer:   {report['encoders']['aesthetic'] or '-'}",
        "",
    ]
    width = max(len(label.format(k=k)) for label in METRIC_LABELS.values())
    for key, label in METRIC_LABELS.items():
        value = report["metrics"][key]
        lines.append(f"  {label.format(k=k):<{width}}  {'-' if value is None else f'{value:.4f}'}")
    lines += ["", f"  {'shot':<14}{'prompt':>8}{'consist.':>10}{'aesthetic':>11}  prompt"]
    for row in report["shots"]:
        aesthetic = row.get("aesthetic")
        prompt = row["prompt"] if len(row["prompt"]) <= 48 else row["prompt"][:45] + "..."
        lines.append(
            f"  {Path(row['file']).stem:<14}"
            f"{'-' if row['prompt_following'] is None else format(row['prompt_following'], '.4f'):>8}"
            f"{'-' if row['consistency_mean'] is None else format(row['consistency_mean'], '.4f'):>10}"
            f"{'-' if aesthetic is None else format(aesthetic, '.4f'):>11}  {prompt}"
        )
    if report["notes"]:
        lines += [""] + [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def plot_similarity(report: dict[str, Any], path: str | Path) -> Path:
    """Shot x shot video-similarity heatmap with the top-k prompt-matched pairs outlined (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    path = Path(path)
    matrix = np.asarray(report["similarity_matrix"], dtype=float)
    labels = [Path(row["file"]).stem for row in report["shots"]]
    n = len(labels)
    size = max(4.0, 0.55 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    # Colour range from the lowest pair similarity: CLIP-like cosines bunch up well above 0.
    off_diagonal = matrix[~np.eye(n, dtype=bool)]
    low = float(np.floor(off_diagonal.min() * 20) / 20) if off_diagonal.size else 0.0
    image = ax.imshow(matrix, cmap="viridis", vmin=min(low, 0.95), vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if matrix[i, j] < (low + 1) / 2 else "black",
                )
    for pair in report["top_pairs"]:
        i, j = pair["indices"]
        for r, c in ((i, j), (j, i)):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    k = report["settings"]["top_k_pairs_used"]
    ax.set_title(f"{report['story']['name']}: shot similarity (red: top-{k} prompt-matched pairs)", fontsize=9)
    ax.set_xlabel(report["encoders"]["video_text"], fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], json_path: str | Path, plot: bool = True) -> list[Path]:
    """Write the report JSON (atomically) and, with `plot`, the similarity chart beside it."""
    json_path = Path(json_path)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    written = [json_path]
    if plot:
        written.append(plot_similarity(report, json_path.with_name(json_path.stem + "_similarity.png")))
    return written

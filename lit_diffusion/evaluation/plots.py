"""Figures shared by callbacks, evaluation and reports (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def grid_cells(rows: Sequence[torch.Tensor | Sequence[torch.Tensor]],
               pad_value: float = 0.5) -> list[torch.Tensor | list[torch.Tensor]]:
    """The rows with every image centred in a cell of the largest height and the largest width among them, on a
    `pad_value` grey (shapes are drawn on white, so the cell's edge shows), so that images of several sizes keep
    their pixels at one scale. Rows whose images all share one size come back as they are."""
    sizes = {tuple(image.shape[-2:]) for row in rows for image in row}
    if len(sizes) <= 1:
        return list(rows)
    ch, cw = max(h for h, _ in sizes), max(w for _, w in sizes)
    out = []
    for row in rows:
        cells = []
        for image in row:  # [3, h, w]
            h, w = image.shape[-2:]
            cell = torch.full((image.shape[0], ch, cw), pad_value, dtype=image.dtype, device=image.device)
            top, left = (ch - h) // 2, (cw - w) // 2
            cell[:, top:top + h, left:left + w] = image
            cells.append(cell)
        out.append(cells)
    return out


def save_grid(rows: Sequence[torch.Tensor | Sequence[torch.Tensor]], row_labels: Sequence[str], out: str | Path,
              col_titles: Sequence[str] | None = None, title: str | None = None, pad_value: float = 0.5) -> Path:
    """rows: each [n_cols, 3, H, W] in [0, 1], or a list of [3, H, W] images of any sizes (e.g. several aspect
    ratios); a label to the left of each row, titles above the columns. Images of several sizes are laid out by
    `grid_cells`: every cell the largest height x the largest width, each image centred on a `pad_value` grey."""
    return _save(grid_figure(rows, row_labels, col_titles, title, pad_value), out)


def grid_figure(rows: Sequence[torch.Tensor | Sequence[torch.Tensor]], row_labels: Sequence[str],
                col_titles: Sequence[str] | None = None, title: str | None = None, pad_value: float = 0.5):
    """`save_grid`'s figure. Matplotlib's constrained layout places the title, the column titles and the row labels
    so that none overlaps another, whatever the numbers of rows and columns (tested on the drawn text boxes)."""
    rows = grid_cells(rows, pad_value)
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    ch, cw = next(image.shape[-2:] for row in rows for image in row)
    aspect = math.sqrt(cw / ch)  # a cell's shape follows its images' at a square cell's area (1.0: as always)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * aspect * n_cols + 2.2, 1.6 / aspect * n_rows + 0.6),
                             squeeze=False, layout="constrained")
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            if j == 0:
                ax.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=7, wrap=True)
            if i == 0 and col_titles:
                ax.set_title(col_titles[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def frame_strip(clip: torch.Tensor, gap: int = 1, pad_value: float = 1.0) -> torch.Tensor:
    """A clip [T, 3, H, W] as one image [3, H, T * W + (T - 1) * gap]: its frames left to right."""
    t, c, h, w = clip.shape
    strip = torch.full((c, h, t * w + (t - 1) * gap), pad_value, dtype=clip.dtype)
    for i in range(t):
        strip[:, :, i * (w + gap): i * (w + gap) + w] = clip[i]
    return strip


def save_video_grid(rows: Sequence[torch.Tensor], row_labels: Sequence[str], out: str | Path,
                    col_titles: Sequence[str] | None = None, title: str | None = None, fps: int = 4) -> list[Path]:
    """rows: each [n_cols, T, 3, H, W] clips in [0, 1]. Writes `out` (a PNG: every cell the clip's frames side by
    side, for a README or a report), the same path with `.gif` (an animated grid, labelled as `save_grid`'s,
    looping at `fps`) and, where PyAV is installed, with `.mp4` (H.264); returns the paths."""
    out = Path(out)
    strips = [[frame_strip(clip) for clip in row] for row in rows]
    paths = [save_grid(strips, row_labels, out, col_titles=col_titles, title=title)]
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in range(rows[0].shape[1]):
            frame_title = f"{title}, frame {t + 1}" if title else f"frame {t + 1}"
            path = save_grid([row[:, t] for row in rows], row_labels, Path(tmp) / f"{t}.png", col_titles=col_titles,
                             title=frame_title)
            frames.append(Image.open(path).convert("RGB"))
    gif = out.with_suffix(".gif")
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)
    paths.append(gif)
    try:  # an MP4 too where PyAV is installed (the `video` extra)
        import av
    except ImportError:
        return paths
    mp4 = out.with_suffix(".mp4")
    w, h = frames[0].size
    with av.open(str(mp4), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"  # H.264 wants even sides
        for frame in frames:
            even = Image.new("RGB", (stream.width, stream.height), (255, 255, 255))
            even.paste(frame)
            container.mux(stream.encode(av.VideoFrame.from_image(even)))
        container.mux(stream.encode())
    return [*paths, mp4]


def save_tradeoff(points: dict[str, list[tuple[float, float, float]]], out: str | Path,
                  title: str = "FID vs CLIP score across guidance scales", fid_label: str = "FID",
                  pareto: Sequence[tuple[float, float]] = ()) -> Path:
    """points: run -> [(guidance, clip_score, fid), ...]; one line per run, guidance written at each point."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, pts in points.items():
        pts = sorted(pts)
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(xs, ys, marker="o", label=name)
        for g, x, y in pts:
            ax.annotate(f"g={g:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if pareto:
        px, py = zip(*sorted(pareto))
        ax.plot(px, py, linestyle="--", color="black", linewidth=1, label="Pareto front")
        ax.scatter(px, py, s=80, facecolors="none", edgecolors="black")
    ax.set_xlabel("CLIP score (higher is better)")
    ax.set_ylabel(f"{fid_label} (lower is better)")
    ax.set_title(title, fontsize=9)
    if len(points) > 1 or pareto:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out)

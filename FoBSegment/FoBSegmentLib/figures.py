"""Figures of real results: support slice with its background ring, query slices with the
predicted contour, the reference contour and the prompts SAM saw, and a 3D view."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backbones.base import slice_to_square
from .geometry import SliceView, occupied_slices
from .preprocessing import fit_normalisation


def _contour(ax, mask, color, lw=1.2, ls="-"):
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=lw, linestyles=ls)


def _aspect(view: SliceView) -> float:
    return view.pixel_spacing[0] / view.pixel_spacing[1]


def organ_rows(query, results: list, references: list, names: list, support_slices: list, n_query: int = 3):
    """Per organ: (support slice, chosen query slices) in stack indices."""
    view = SliceView.for_volume(query)
    rows = []
    for res, ref, name, s in zip(results, references, names, support_slices):
        g = view.to_stack(ref)
        idx = [i for i in occupied_slices(g) if i != s]
        picks = [idx[int(len(idx) * f)] for f in np.linspace(0.15, 0.85, n_query)] if idx else []
        rows.append((name, s, picks))
    return rows


def result_figure(path, query, results, references, names, support_slices, colors, with_3d: bool = False,
                  title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .background_ring import ring_points

    view = SliceView.for_volume(query)
    stack = view.to_stack(query.array)
    norm = fit_normalisation(query.array)
    rows = organ_rows(query, results, references, names, support_slices)
    ncols = 4 + (1 if with_3d else 0)
    fig = plt.figure(figsize=(3.2 * ncols, 3.3 * len(rows)), dpi=110)
    asp = _aspect(view)
    for r, ((name, s, picks), res, ref, color) in enumerate(zip(rows, results, references, colors)):
        g = view.to_stack(ref)
        p = view.to_stack(res.mask > 0)
        ax = fig.add_subplot(len(rows), ncols, r * ncols + 1)
        ax.imshow(norm.apply(stack[s]), cmap="gray", aspect=asp)
        _contour(ax, g[s], color, lw=1.5)
        L = max(stack.shape[1:])
        msq = slice_to_square(g[s]) > 0.5
        if msq.any():
            ring = ring_points(msq) * L - 0.5
            ax.scatter(ring[:, 0], ring[:, 1], s=14, c="red", edgecolors="white", linewidths=0.4)
        ax.set_title(f"support: {name}, slice {s}\n(annotation + background ring)", fontsize=8)
        ax.axis("off")
        prompts = {pr.slice_index: pr for pr in res.prompts}
        for c, i in enumerate(picks):
            ax = fig.add_subplot(len(rows), ncols, r * ncols + 2 + c)
            ax.imshow(norm.apply(stack[i]), cmap="gray", aspect=asp)
            _contour(ax, g[i], "cyan", lw=1.0, ls="--")
            _contour(ax, p[i], color, lw=1.5)
            pr = prompts.get(i)
            if pr is not None and pr.points_rc is not None and len(pr.points_rc):
                fg = pr.points_rc[pr.labels == 1]
                bg = pr.points_rc[pr.labels == 0]
                ax.scatter(fg[:, 1], fg[:, 0], s=10, c="lime", edgecolors="black", linewidths=0.3)
                ax.scatter(bg[:, 1], bg[:, 0], s=10, c="red", edgecolors="white", linewidths=0.3)
            if pr is not None and pr.box_rc is not None:
                (r0, c0), (r1, c1) = pr.box_rc
                ax.plot([c0, c1, c1, c0, c0], [r0, r0, r1, r1, r0], color="yellow", lw=0.8)
            inter = (g[i] & p[i]).sum()
            d = 2 * inter / max(1, g[i].sum() + p[i].sum())
            ax.set_title(f"query slice {i}: Dice {d:.2f}", fontsize=8)
            ax.axis("off")
        if with_3d:
            ax = fig.add_subplot(len(rows), ncols, r * ncols + ncols, projection="3d")
            _render_3d(ax, res.mask > 0, query, color)
            ax.set_title(f"3D: {name} (FoB)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.005, "solid: FoBSegment result; dashed cyan: reference; red dots: background ring; "
             "green: foreground points; yellow: box prompt", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97 if title else 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _render_3d(ax, mask, volume, color):
    from skimage.measure import marching_cubes

    if mask.sum() < 10:
        ax.axis("off")
        return
    sp = volume.spacing[::-1]  # (k, j, i) spacing
    verts, faces, _, _ = marching_cubes(np.pad(mask, 1).astype(np.float32), 0.5, spacing=sp, step_size=1)
    lps = verts[:, ::-1] @ volume.direction.T
    ax.plot_trisurf(lps[:, 0], lps[:, 1], faces, -lps[:, 2] * 0 + lps[:, 2], color=color, lw=0, alpha=0.9)
    ax.view_init(elev=15, azim=-60)
    ax.set_axis_off()

"""The learned FoB generator as the pipeline's start prompter (research use).

Its rings are good on adjacent slices and poor for relocating an organ in another patient
(``weights/MODEL_CARD.md``), so the default start prompter is the training-free contrast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..background_ring import ring_points, ring_to_box
from ..errors import FoBInputError
from ..pipeline.slice_prompting import SlicePrompt
from ..pipeline.contrast import contrast_region
from ..settings import DEFAULT_SETTINGS, RING_INNER_PX, RING_MARGIN_PX, RING_OUTER_PX

STRATEGIES = ("points", "box", "box+points")


def contrast_prior_ring(q_emb, anchor, settings) -> np.ndarray | None:
    """The position prior found on the query: the background ring around the training-free
    contrast region (:func:`contrast_region`), or None where there is none.  One function for
    training (``--prior-source contrast``) and run time (``prior="contrast"``), so the
    generator meets the prior it was trained on."""
    region = contrast_region(q_emb, anchor, settings)
    if region is None or not region.any():
        return None
    try:
        return ring_points(region, outer_radius=RING_OUTER_PX, inner_radius=RING_INNER_PX)
    except ValueError:  # no ring could be traced around the region
        return None


class GeneratorPrompter:
    """Background ring (and coarse foreground) of the learned generator -> SAM prompt.

    ``strategy``: ``points`` (foreground points + the ring as background points, the paper's
    setting for point-trained SAM), ``box`` (the box the ring encloses, shrunk by the ring
    margin: for box-trained models), ``box+points`` (both), ``auto`` (the one the weights were
    trained for, else by backbone).  ``use_spr=False`` is the ablation without ring refinement;
    ``prior_weight=0`` searches the query without the support ring's position prior;
    ``prior="contrast"`` takes the position prior from the query instead: the ring around the
    training-free contrast region (:class:`ContrastPrompter`), which the generator refines."""

    name = "fob"

    def __init__(self, backbone, weights=None, strategy: str = "auto", use_spr: bool = True, prior_weight: float = 1.0,
                 prior: str | None = None, settings=None):
        from ..pipeline.segmenter import default_weights
        from .prompt_generator import load_generator

        weights = Path(weights) if weights else default_weights(backbone.name)
        if weights is None:
            raise FoBInputError(
                f"No FoB generator weights for backbone {backbone.name!r}. Train them with `fobsegment train` "
                "and pass --weights.")
        if not weights.is_file():
            raise FoBInputError(f"Generator weights {weights} not found. Check the --weights path.")
        self.weights = weights  # what a batch records as part of a case's recipe
        self.generator, self.meta = load_generator(weights, device=backbone.device)
        self.generator.eval()
        if not use_spr:  # coarse (soft-argmax) ring points, no refinement
            self.generator.refiner = None
        trained_for = self.meta.get("backbone")
        if trained_for and trained_for != backbone.name:
            raise FoBInputError(
                f"The generator weights {weights.name} were trained for backbone {trained_for!r}, not "
                f"{backbone.name!r}. Use --backbone {trained_for} or weights trained for this backbone.")
        if strategy == "auto":
            strategy = self.meta.get("default_prompt") or ("box" if backbone.box_trained else "box+points")
        if strategy not in STRATEGIES:
            raise FoBInputError(f"Unknown prompt strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
        self.strategy = strategy
        self.device = backbone.device
        self.prior_weight = prior_weight
        prior = prior or self.meta.get("prior_source") or "support"  # as the weights were trained
        if prior not in ("support", "contrast"):
            raise FoBInputError(f"Unknown generator prior {prior!r}: use support or contrast.")
        self.prior = prior
        self.contrast_settings = (settings or DEFAULT_SETTINGS).contrast
        self._rings: dict = {}

    def _support_ring(self, sup) -> np.ndarray:
        key = id(sup.mask_sq)
        if key not in self._rings:
            self._rings[key] = (sup.mask_sq, ring_points(sup.mask_sq, outer_radius=RING_OUTER_PX,
                                                         inner_radius=RING_INNER_PX))
        return self._rings[key][1]

    def _prior_ring(self, q_emb, sup):
        if self.prior == "support":
            return None
        ring = contrast_prior_ring(q_emb, sup, self.contrast_settings)
        if ring is None:
            return None
        return torch.as_tensor(ring, dtype=torch.float32)[None].to(self.device)

    @torch.inference_mode()
    def output(self, q_emb, sup):
        """The generator on one (support, query) pair -> GeneratorOutput with B = 1."""
        dev = self.device
        return self.generator(
            torch.as_tensor(sup.embedding)[None].to(dev), torch.as_tensor(sup.mask_sq, dtype=torch.float32)[None].to(dev),
            torch.as_tensor(self._support_ring(sup), dtype=torch.float32)[None].to(dev),
            torch.as_tensor(q_emb)[None].to(dev), torch.tensor([self.prior_weight], dtype=torch.float32).to(dev),
            self._prior_ring(q_emb, sup))

    def start_prompt(self, q_emb, sup) -> tuple[SlicePrompt, np.ndarray]:
        from .prompt_generator import foreground_points

        out = self.output(q_emb, sup)
        bg = out.points[0].float().cpu().numpy()
        fg_prob = out.fg_prob[0].float().cpu().numpy()
        fg = np.asarray(foreground_points(fg_prob), dtype=np.float32).reshape(-1, 2)
        box = np.asarray(ring_to_box(bg, RING_MARGIN_PX), np.float32)
        if self.strategy == "points":
            return SlicePrompt.make(fg=fg, bg=bg), fg_prob
        if self.strategy == "box":
            return SlicePrompt.make(box=box), fg_prob
        return SlicePrompt.make(fg=fg, bg=bg, box=box), fg_prob

"""Training-free localisation by background prototypes (pipeline.contrast)."""

import dataclasses

import numpy as np
import torch

from conftest import shared_pair
from FoBSegmentLib.backbones.base import slice_to_square
from FoBSegmentLib.geometry import SliceView, occupied_slices
from FoBSegmentLib.pipeline.contrast import contrast_region, prototype_contrast, prototypes
from FoBSegmentLib.preprocessing import fit_normalisation
from FoBSegmentLib.settings import DEFAULT_SETTINGS


def test_prototype_contrast_tells_structure_from_surroundings():
    """A synthetic embedding whose channels differ inside and around a disk: the disk
    contrasts positive against its own prototypes, the band around it negative."""
    yy, xx = np.mgrid[:256, :256]
    disk = (yy - 128) ** 2 + (xx - 128) ** 2 <= 40 ** 2
    emb = torch.zeros(256, 64, 64)
    inside = torch.as_tensor(slice_to_square(disk.astype(np.float32), 64) > 0.5)
    emb[:128][:, inside] = 1.0
    emb[128:][:, ~inside] = 1.0
    fg, bg = prototypes(emb, disk)
    ring = ((yy - 128) ** 2 + (xx - 128) ** 2 <= 56 ** 2) & ~disk
    assert prototype_contrast(emb, disk, (fg, bg)) > 0.5
    assert prototype_contrast(emb, ring, (fg, bg)) < -0.5
    assert prototype_contrast(emb, np.zeros_like(disk), (fg, bg)) == 0.0


def test_contrast_region_tells_the_spleen_from_the_left_kidney(segmenter):
    """On patient 8 the spleen's contrast also lights up the left kidney.  Cutting candidates
    at several levels and weighing their surroundings must pick the spleen; one level without
    surroundings picks the kidney on this very slice."""
    s, q, spleen, _, sup_slices, _ = shared_pair("chaos_t2spir_mri", 2, 8, label=4)
    from FoBSegmentLib.io import read_volume
    from conftest import shared_case

    q_lab = np.rint(read_volume(shared_case("chaos_t2spir_mri", 8)[1]).array)
    central = segmenter.prepare_support(s, spleen, sup_slices).central()
    q_view = SliceView.for_volume(q)
    q_spleen, q_kidney = q_view.to_stack(q_lab == 4), q_view.to_stack(q_lab == 3)
    idx = occupied_slices(q_spleen)
    mid = int(idx[len(idx) // 2])
    assert q_kidney[mid].any(), "the test slice must show both organs"
    emb = segmenter.embedder.embed(q_view.to_stack(q.array), fit_normalisation(q.array), [mid])[mid]
    on_spleen = slice_to_square(q_spleen[mid]) > 0.5
    on_kidney = slice_to_square(q_kidney[mid]) > 0.5

    region = contrast_region(emb, central, DEFAULT_SETTINGS.contrast)
    assert (region & on_spleen).sum() > 0.5 * region.sum()
    assert not (region & on_kidney).any()
    old = contrast_region(emb, central, dataclasses.replace(DEFAULT_SETTINGS.contrast, levels=(0.0,),
                                                            context_weight=0.0))
    assert (old & on_kidney).sum() > 0.5 * old.sum()

"""Training-free localisation by background prototypes (pipeline.contrast)."""

import dataclasses

import numpy as np

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
    emb = np.zeros((256, 64, 64), np.float32)
    inside = slice_to_square(disk.astype(np.float32), 64) > 0.5
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


def test_contrast_region_splits_a_spleen_merged_with_the_left_kidney(segmenter):
    """On patient 1's slice 27, from patient 5's spleen, positive contrast runs over the spleen
    and the left kidney as one region, which outscores either organ alone.  The highest level
    parts them and the default takes the better part: the spleen (this seed had made the
    ep1 run follow both organs: Dice 0.54, now 0.95)."""
    from FoBSegmentLib.io import read_volume
    from conftest import shared_case

    s, q, spleen, _, sup_slices, _ = shared_pair("chaos_t2spir_mri", 5, 1, label=4)
    q_lab = np.rint(read_volume(shared_case("chaos_t2spir_mri", 1)[1]).array)
    central = segmenter.prepare_support(s, spleen, sup_slices).central()
    q_view = SliceView.for_volume(q)
    z = 27
    emb = segmenter.embedder.embed(q_view.to_stack(q.array), fit_normalisation(q.array), [z])[z]
    on_spleen = slice_to_square(q_view.to_stack(q_lab == 4)[z]) > 0.5
    on_kidney = slice_to_square(q_view.to_stack(q_lab == 3)[z]) > 0.5

    region = contrast_region(emb, central, DEFAULT_SETTINGS.contrast)
    assert (region & on_spleen).sum() > 0.9 * region.sum() and not (region & on_kidney).any()
    merged = contrast_region(emb, central, dataclasses.replace(DEFAULT_SETTINGS.contrast, split_fraction=None))
    assert (merged & on_spleen).sum() > 0.3 * merged.sum() and (merged & on_kidney).sum() > 0.3 * merged.sum()
    assert (merged & region).sum() == region.sum()  # the part lies inside the merged region

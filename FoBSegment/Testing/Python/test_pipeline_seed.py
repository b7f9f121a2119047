"""The whole-volume seed search on another patient's volume (pipeline.seed)."""

import numpy as np
import pytest

from conftest import dice, shared_case, shared_pair
from FoBSegmentLib.geometry import SliceView, occupied_slices
from FoBSegmentLib.io import read_volume


def test_solidity_tells_a_crescent_from_a_disc_at_any_aspect():
    from FoBSegmentLib.preprocessing import solidity

    yy, xx = np.mgrid[:128, :128]
    disc = np.hypot(yy - 64, xx - 64) <= 30
    crescent = disc & (np.hypot(yy - 64, xx - 84) > 26)
    assert solidity(disc) > 0.95 and 0.4 < solidity(crescent) < 0.8
    stretched = np.repeat(crescent, 2, axis=1)  # the work grid resamples slices anisotropically
    assert abs(solidity(stretched) - solidity(crescent)) < 0.03
    assert solidity(np.zeros((8, 8), bool)) == 1.0


def test_seed_search_tells_the_rv_crescent_from_the_round_blood_pool(segmenter):
    """MS-CMRSeg patient 6's RV from patient 1's annotation (EP1): inside, the RV and the LV
    blood pool look alike and the blood pool scores best, so with neither the shape prior nor
    the support's agreement the seed and the walk are on it (Dice 0.00).  The RV is a crescent
    (solidity about 0.75), the blood pool a disc (0.98): with the prior (the default for a
    support that is a crescent on every slice) the RV is found (measured 0.86); the support's
    annotation also agrees more with the RV's walk than with the blood pool's, which finds it
    without the prior."""
    s, q, rv, gt, sup, ref = shared_pair("mscmrseg19_bssfp_cmr", 1, 6, label=600)
    neither = segmenter.with_settings(**{"seed.shape_width": 0.0, "seed.agreement_weight": 0.0})
    off = neither.segment(q, s, rv, support_slices=sup, query_slices=ref)
    pool = np.rint(read_volume(shared_case("mscmrseg19_bssfp_cmr", 6)[1]).array) == 500
    m = off.mask.astype(bool)
    assert dice(m, gt) < 0.1 and (m & pool).sum() > 0.5 * m.sum()
    for change in ({"seed.agreement_weight": 0.0}, {"seed.shape_width": 0.0}, {}):
        one = segmenter.with_settings(**change).segment(q, s, rv, support_slices=sup, query_slices=ref)
        assert dice(one.mask, gt) > 0.8, change


def test_shape_prior_is_for_supports_that_are_crescents_on_every_slice(segmenter):
    """The RV's three annotated slices are all crescents, so its seeds are weighed by shape (one
    slice is not enough to say so); a liver has convex slices among its annotated ones (its
    shape varies from slice to slice), so its seed scores are the same with and without the
    prior."""
    from FoBSegmentLib.pipeline.contrast import seed_score

    s, _, rv, _, sup, _ = shared_pair("mscmrseg19_bssfp_cmr", 1, 6, label=600)
    rv_support = segmenter.prepare_support(s, rv, sup)
    limit = segmenter.settings.seed.shape_max_solidity
    assert len(rv_support.slices) == 3 and rv_support.central().most_solid < limit
    one = segmenter.prepare_support(s, rv, sup[1:2]).central()
    assert one.solidity < limit and len(one.siblings) < segmenter.settings.seed.shape_min_slices
    s, _, liver, _, sup, _ = shared_pair("chaos_t2spir_mri", 1, 2, label=1)
    anchor = segmenter.prepare_support(s, liver, sup).central()
    assert anchor.most_solid >= limit
    st = segmenter.settings
    cy, cx = (int(v.mean()) for v in np.nonzero(anchor.mask_sq))
    bitten = anchor.mask_sq & (np.hypot(*np.mgrid[-cy:256 - cy, -cx:256 - cx]) > 25)  # less solid
    args = (anchor.embedding, bitten, 0.9, anchor, st.presence, st.contrast)

    def score(**change):
        return seed_score(*args, segmenter.with_settings(**change).settings.seed if change else st.seed)

    assert score() == score(**{"seed.shape_width": 0.0}) > 0
    assert score(**{"seed.shape_max_solidity": 1.01}) < score(), "applied to every support, it would weigh this"
    from skimage.morphology import convex_hull_image

    rv_anchor = rv_support.central()
    filled = convex_hull_image(rv_anchor.mask_sq)  # the RV's crescent made a disc-like blob
    rv_args = (rv_anchor.embedding, filled, 0.9, rv_anchor, st.presence, st.contrast)
    four = segmenter.with_settings(**{"seed.shape_min_slices": 4}).settings.seed
    assert 0 < seed_score(*rv_args, st.seed) < 0.5 * seed_score(*rv_args, four), "3 crescent slices: on; 4 needed: off"


def test_shape_prior_boundary_lies_between_the_rv_and_every_chaos_organ(segmenter):
    """The crescent test's limit sits between the most compact RV support (patient 9: its most
    solid annotated slice 0.86) and the least compact CHAOS organ support (patient 19's spleen:
    0.875), so the one gets the shape prior and the other does not.  Without the prior patient
    9's RV run on patient 2's volume missed its RV entirely (Dice 0.00)."""
    limit = segmenter.settings.seed.shape_max_solidity
    s, q, rv, gt, sup, _ = shared_pair("mscmrseg19_bssfp_cmr", 9, 2, label=600)
    rv_most = segmenter.prepare_support(s, rv, sup).central().most_solid
    res = segmenter.segment(q, s, rv, support_slices=sup)
    assert dice(res.mask, gt) > 0.8  # measured 0.91; 0.00 with the limit at 0.85
    s, _, spleen, _, sup, _ = shared_pair("chaos_t2spir_mri", 19, 2, label=4)
    spleen_most = segmenter.prepare_support(s, spleen, sup).central().most_solid
    assert 0.85 < rv_most < limit <= spleen_most < 0.88, (rv_most, limit, spleen_most)


def test_seed_search_finds_organs_outside_the_supports_relative_position(segmenter):
    """Fields of view differ: patient 13's left kidney lies in slices 1-16 of 36, patient 1's
    in 14-29 of 37, and the spleen (same texture) sits where the support says the kidney
    should be.  The seed search must scan the whole volume and tell the kidney by its
    surroundings (a search near the support's relative position found the spleen: Dice 0.0)."""
    s, q, kidney, gt, sup, ref = shared_pair("chaos_t2spir_mri", 1, 13, label=3)
    res = segmenter.segment(q, s, kidney, support_slices=sup)
    seed = [i for i, v in res.slice_info.items() if v.get("reason") == "seed"]
    assert len(seed) == 1 and ref[0] <= seed[0] <= ref[-1]
    kept = sorted(i for i, v in res.slice_info.items() if v.get("kept"))
    assert ref[0] - 1 <= kept[0] and kept[-1] <= ref[-1] + 1
    assert dice(res.mask, gt) > 0.85  # measured 0.928


@pytest.mark.slow
def test_seed_search_keeps_to_the_supports_side_of_the_body(segmenter):
    """Patient 1's right kidney from patient 2's annotation, whole volume: without the side
    prior the mirror-image left kidney wins the seed search and the walk follows it (0.00)."""
    s, q, kidney, gt, sup, _ = shared_pair("chaos_t2spir_mri", 2, 1, label=2)
    res = segmenter.segment(q, s, kidney, support_slices=sup)
    assert dice(res.mask, gt) > 0.85  # measured 0.96
    before = segmenter.with_settings(**{"seed.side_prior": False}).segment(q, s, kidney, support_slices=sup)
    left = np.rint(read_volume(shared_case("chaos_t2spir_mri", 1)[1]).array) == 3
    assert dice(before.mask, gt) < 0.1 and (before.mask.astype(bool) & left).sum() > 0.5 * left.sum()


@pytest.mark.slow
def test_other_patient_support_chaos_liver(segmenter):
    """One liver slice of patient 1 segments patient 2's liver (measured 0.756); the walk
    reaches both ends of the liver and below its tip follows a liver-like neighbour for at
    most 7 slices (the known weakness)."""
    s, q, liver, gt, _, ref = shared_pair("chaos_t2spir_mri", 1, 2, label=1)
    from conftest import one_slice_support

    support, _, _ = one_slice_support(s, liver)
    res = segmenter.segment(q, s, support)
    assert dice(res.mask, gt) > 0.65
    kept = sorted(i for i, v in res.slice_info.items() if v.get("kept"))
    assert kept and kept[0] <= ref[0] + 1 and kept[-1] >= ref[-1] - 1, "the walk must not stop inside the liver"
    assert kept[0] >= ref[0] - 8 and kept[-1] <= ref[-1] + 2, "the walk ran further past the liver than measured"
    assert occupied_slices(SliceView.for_volume(q).to_stack(res.mask > 0))


@pytest.mark.slow
def test_seed_walks_on_another_structure_when_it_holds_more_evidence(segmenter):
    """Patient 2's liver from patient 5's annotation, whole volume: the clearest single slice
    is the colon below the liver (slices 0-6; a single walk there scored Dice 0.00).  Walking
    the next seeds on other structures too and keeping the walk whose slices go on looking
    like the support finds the liver (measured 0.69)."""
    s, q, liver, gt, sup, ref = shared_pair("chaos_t2spir_mri", 5, 2, label=1)
    one = segmenter.with_settings(**{"seed.walks": 1}).segment(q, s, liver, support_slices=sup)
    assert dice(one.mask, gt) < 0.05
    seen = []
    res = segmenter.segment(q, s, liver, support_slices=sup, progress=lambda d, t: seen.append((d, t)))
    assert dice(res.mask, gt) > 0.6
    kept = sorted(i for i, v in res.slice_info.items() if v.get("kept"))
    assert [i for i, v in res.slice_info.items() if v.get("reason") == "seed"] and ref[0] - 2 <= kept[0]
    # The kept walk alone is the result: its slices, prompts and mask agree, nothing of the others.
    assert sorted(p.slice_index for p in res.prompts) == kept
    assert set(occupied_slices(SliceView.for_volume(q).to_stack(res.mask > 0))) <= set(kept)
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:])) and seen[-1][0] == seen[-1][1]


@pytest.mark.slow
def test_seed_search_can_score_the_second_place_of_each_slice(segmenter):
    """Patient 2's right kidney from patient 8's annotation (EP1): on every slice the best
    contrast region lies on a look-alike beside the kidney, so with one place per slice (the
    default) every seed is on it (Dice 0.00); with ``seed.regions`` 2 the second place of a
    slice is the kidney, and it scores best."""
    from FoBSegmentLib.pipeline.contrast import contrast_region, contrast_regions
    from FoBSegmentLib.preprocessing import fit_normalisation

    s, q, kidney, gt, sup, ref = shared_pair("chaos_t2spir_mri", 8, 2, label=2)
    one = segmenter.segment(q, s, kidney, support_slices=sup, query_slices=ref)
    assert dice(one.mask, gt) < 0.1  # measured 0.00
    two = segmenter.with_settings(**{"seed.regions": 2}).segment(q, s, kidney, support_slices=sup, query_slices=ref)
    assert dice(two.mask, gt) > 0.85  # measured 0.94

    anchor = segmenter.prepare_support(s, kidney, sup).central()
    mid = ref[len(ref) // 2]
    emb = segmenter.embedder.embed(SliceView.for_volume(q).to_stack(q.array), fit_normalisation(q.array), [mid])[mid]
    first, second = contrast_regions(emb, anchor, segmenter.settings.contrast, 2)
    assert np.array_equal(first, contrast_region(emb, anchor, segmenter.settings.contrast))
    assert (first & second).sum() < 0.5 * min(first.sum(), second.sum()), "two places, not one twice"


def test_the_support_agrees_more_with_a_walk_on_its_own_organ(ct, segmenter):
    """The support's side of the walk check (``seed.support_agreement``): the CT's liver,
    annotated on one field of view, agrees more with the liver of another field of view than
    with the spleen there.  A walk's strength is its evidence x exp(weight x the agreement's
    gap to the first walk's); a gap within ``seed.agreement_min_gap`` (the CT's liver and
    spleen, alike on CT) leaves the evidence alone."""
    from conftest import other_field_of_view
    from FoBSegmentLib.backbones.base import slice_to_square
    from FoBSegmentLib.pipeline.run import QueryRun
    from FoBSegmentLib.pipeline.seed import support_agreement, walk_strength

    vol, labels = ct
    sup_vol, sup_lab = other_field_of_view(vol, labels, 0, 76)
    qry_vol, qry_lab = other_field_of_view(vol, labels, 36, 112)
    support = segmenter.prepare_support(sup_vol, sup_lab == 5)
    run = QueryRun(segmenter, qry_vol)
    view = SliceView.for_volume(qry_vol)

    def walk_on(label):
        stack = view.to_stack(qry_lab == label)
        run.kept = {i: slice_to_square(stack[i]) > 0.5 for i in occupied_slices(stack)}
        return support_agreement(run, lambda i: support.central())

    liver, spleen = walk_on(5), walk_on(1)
    assert liver > 1.3 * spleen > 0
    seed = segmenter.settings.seed
    far = spleen + 2 * seed.agreement_min_gap
    assert walk_strength(2.0, far, spleen, seed) == pytest.approx(2.0 * np.exp(seed.agreement_weight * (far - spleen)))
    assert walk_strength(2.0, spleen, far, seed) < 2.0
    # 0.04 apart here: too close to outweigh the evidence
    assert walk_strength(2.0, liver, spleen, seed) == 2.0 == walk_strength(2.0, spleen, liver, seed)


def test_walk_choice_weighs_the_supports_agreement(segmenter):
    """CHAOS patient 19's left kidney from patient 8's annotation, no oracle.  Two seeds are
    walked: the first keeps part of the kidney (Dice 0.46), the second the whole of it (0.94)
    but with less than the margin's times the first's evidence, so by evidence alone the part
    is kept.  The support's annotation agrees more with the whole kidney's walk (0.34 against
    0.20), which decides for it."""
    s, q, kidney, gt, sup, _ = shared_pair("chaos_t2spir_mri", 8, 19, label=3)
    off = segmenter.with_settings(**{"seed.agreement_weight": 0.0}).segment(q, s, kidney, support_slices=sup)
    on = segmenter.segment(q, s, kidney, support_slices=sup)
    assert dice(off.mask, gt) < 0.6
    assert dice(on.mask, gt) > 0.9


def test_the_agreement_is_not_weighed_between_two_walks_of_one_structure(segmenter, monkeypatch):
    """MS-CMRSeg patient 10's blood pool from patient 5's annotation, no oracle.  The second
    seed lies on the slice past the apex where the first walk stopped, so its walk is the same
    blood pool two slices longer (the walks' 3D Dice above 0.9).  Its extent moves the slices
    the support is compared with, and the agreement rises by 0.06: weighed, it would keep the
    walk past the apex (Dice 0.90); two walks of one structure are told apart by their
    evidence, which keeps the first (0.94)."""
    from FoBSegmentLib.pipeline import protocols

    s, q, pool, gt, sup, _ = shared_pair("mscmrseg19_bssfp_cmr", 5, 10, label=500)
    overlaps = []
    original = protocols.walk_overlap

    def recorded(run, first):
        overlaps.append(original(run, first))
        return overlaps[-1]

    monkeypatch.setattr(protocols, "walk_overlap", recorded)
    kept = segmenter.segment(q, s, pool, support_slices=sup)
    monkeypatch.undo()
    weighed = segmenter.with_settings(**{"seed.same_structure_dice": 1.01}).segment(q, s, pool, support_slices=sup)
    assert overlaps and overlaps[0] > 0.9
    assert dice(kept.mask, gt) > 0.93
    assert dice(weighed.mask, gt) < 0.91

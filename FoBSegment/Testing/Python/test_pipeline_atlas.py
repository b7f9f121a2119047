"""Several support patients (pipeline.atlas, Segmenter.segment_atlas, segment --support-mask x N)."""

import numpy as np
import pytest

from conftest import dice, one_slice_support, other_field_of_view as crop
from FoBSegmentLib.errors import CancelledError, FoBInputError
from FoBSegmentLib.pipeline.atlas import agreement, fuse, outliers


def test_fusion_rules_on_organ_masks(ct):
    _, labels = ct
    liver, spleen = labels == 5, labels == 1
    liver_low = liver.copy()
    liver_low[: int(np.nonzero(liver.any((1, 2)))[0].mean())] = False  # a run that lost the upper liver
    masks = [liver, liver_low, spleen]
    voted = fuse(masks, "vote")
    assert voted.dtype == np.uint8 and np.array_equal(voted > 0, liver_low)  # 2 of 3 agree only there
    assert np.array_equal(fuse([liver, liver, spleen], "vote") > 0, liver)
    assert np.array_equal(fuse([liver, spleen], "vote") > 0, liver | spleen)  # a tie keeps the voxel
    a = agreement(masks)
    assert a[2] < 0.01 and a[0] > 0.4 and abs(a[0] - a[1]) < 1e-9  # (Dice 0.92 + 0) / 2
    assert np.array_equal(fuse(masks, "consensus") > 0, liver)  # first of the two that agree best
    rows = [{"support": n + 1, "dice_to_fused": dice(m, voted)} for n, m in enumerate(masks)]
    assert outliers(rows, 0.5) == [3] and outliers(rows[:2], 0.5) == []
    with pytest.raises(FoBInputError, match="different grids"):
        fuse([liver, liver[1:]], "vote")
    with pytest.raises(FoBInputError, match="Unknown atlas fusion rule"):
        fuse(masks, "mean")


def test_atlas_outvotes_a_support_unlike_the_others(ct, segmenter):
    """Query: the example CT.  Atlas: two other fields of view with the liver painted on one
    slice, and a third whose 'liver' is the spleen (a support unlike the others).  The default
    fusion keeps one of the two livers (the fusion of the three single runs) and names the third."""
    vol, labels = ct
    gt = labels == 5
    supports = []
    for k0, k1, organ in ((0, 100, 5), (15, 112, 5), (0, 112, 1)):
        v, lab = crop(vol, labels, k0, k1)
        supports.append((v, one_slice_support(v, lab == organ)[0]))
    singles = [segmenter.segment(vol, v, m) for v, m in supports]
    seen = []
    res = segmenter.segment_atlas(vol, supports, progress=lambda d, t: seen.append((d, t)))
    assert np.array_equal(res.mask, fuse([r.mask for r in singles], "consensus"))  # the default
    assert np.array_equal(res.mask, singles[int(np.argmax(agreement([r.mask for r in singles])))].mask)
    d_single = [dice(r.mask, gt) for r in singles]
    assert d_single[2] < 0.2 < min(d_single[:2])  # the spleen support does mislead its own run
    assert dice(res.mask, gt) >= min(d_single[:2]) - 0.02
    assert [s["unlike_others"] for s in res.supports] == [False, False, True]
    assert [s["support"] for s in res.supports] == [1, 2, 3]
    assert seen and seen[-1][0] == seen[-1][1] and all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))
    kept = [i for i, v in res.slice_info.items() if v["kept"]]
    assert kept and all(1 <= res.slice_info[i]["votes"] <= res.slice_info[i]["of"] == 3 for i in kept)


def test_atlas_inputs_are_checked_before_work(ct, segmenter, monkeypatch):
    vol, labels = ct
    v, lab = crop(vol, labels, 0, 100)
    m = one_slice_support(v, lab == 5)[0]
    before = segmenter.encoded_count

    def no_run(*a, **k):  # the cache of earlier tests could hide a run; a spy cannot be fooled
        raise AssertionError("a support's run started before the atlas inputs were checked")

    monkeypatch.setattr(segmenter, "segment", no_run)
    with pytest.raises(FoBInputError, match="query itself"):
        segmenter.segment_atlas(vol, [(v, m), (vol, labels == 5)])
    with pytest.raises(FoBInputError, match="at least one support"):
        segmenter.segment_atlas(vol, [])
    with pytest.raises(FoBInputError, match="Unknown atlas fusion rule"):
        segmenter.segment_atlas(vol, [(v, m)], rule="mean")
    with pytest.raises(FoBInputError, match="support 2 of the atlas"):
        segmenter.segment_atlas(vol, [(v, m), (labels, m)])
    with pytest.raises(FoBInputError, match=r"Atlas support 2: the support mask is empty"):
        segmenter.segment_atlas(vol, [(v, m), (v, np.zeros_like(m))])
    with pytest.raises(FoBInputError, match=r"Atlas support 2: the mask has shape"):
        segmenter.segment_atlas(vol, [(v, m), (v, m[1:])])
    with pytest.raises(FoBInputError, match=r"^Slice range 30:5 runs backwards"):
        segmenter.segment_atlas(vol, [(v, m)], slice_range=(30, 5))
    assert segmenter.encoded_count == before  # refused before the first run
    monkeypatch.undo()

    def cancel():
        return True

    with pytest.raises(CancelledError):
        segmenter.segment_atlas(vol, [(v, m), (v, m)], is_cancelled=cancel)


@pytest.fixture
def atlas_files(tmp_path, example_ct):
    """The example CT as the query and two other fields of view of it, each with the liver
    painted on one slice, as files."""
    import SimpleITK as sitk

    img, lab = example_ct
    ct, seg = sitk.ReadImage(str(img)), sitk.ReadImage(str(lab))
    files = []
    for n, (k0, k1) in enumerate(((0, 100), (15, 112)), 1):
        c, s = ct[:, :, k0:k1], sitk.GetArrayFromImage(seg[:, :, k0:k1]) == 5
        one = np.zeros(s.shape, np.uint8)
        k = int(np.argmax(s.sum((1, 2))))
        one[k] = s[k]
        m = sitk.GetImageFromArray(one)
        m.CopyInformation(c)
        sitk.WriteImage(c, str(tmp_path / f"support{n}.nii.gz"))
        sitk.WriteImage(m, str(tmp_path / f"support{n}_liver.nii.gz"))
        files += ["--support-volume", str(tmp_path / f"support{n}.nii.gz"),
                  "--support-mask", str(tmp_path / f"support{n}_liver.nii.gz")]
    return img, files


def test_cli_segments_from_an_atlas_of_two_supports(atlas_files, ct, tmp_path, capsys):
    import slicerio

    from FoBSegmentLib.cli import main
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.io import read_support_mask

    img, files = atlas_files
    vol, labels = ct
    g = SliceView.for_volume(vol).to_stack(labels == 5)
    k = int(np.argmax(g.sum((1, 2))))
    out = tmp_path / "liver.seg.nrrd"
    code = main(["segment", "--volume", str(img), *files, "--slices", f"{k - 4}:{k + 4}", "--output", str(out),
                 "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert slicerio.read_segmentation(str(out))["segments"][0]["name"] == "label_1 (FoB)"
    assert "support 1 (support1_liver.nii.gz): Dice to the fused mask" in printed and "support 2 (" in printed
    back = SliceView.for_volume(vol).to_stack(read_support_mask(out, vol).mask)
    assert dice(back[k - 4:k + 5], g[k - 4:k + 5]) > 0.8


def test_cli_atlas_options_are_checked_before_work(atlas_files, tmp_path, capsys):
    from FoBSegmentLib.cli import main

    img, files = atlas_files
    out = tmp_path / "out.nii.gz"
    v1, m1, v2, m2 = files[1], files[3], files[5], files[7]
    for argv, msg in ((["--support-volume", v1, "--support-mask", m1, "--support-mask", m2],
                       "give each mask its own --support-volume"),
                      (files + ["--support-slices", "3"], "--support-slices names slices of one support"),
                      (["--support-volume", v1, "--support-volume", v2, "--support-mask", m1],
                       "give one --support-mask per")):
        code = main(["segment", "--volume", str(img), *argv, "--output", str(out)])
        err = capsys.readouterr().err
        assert code != 0 and msg in err and "Traceback" not in err and not out.exists()

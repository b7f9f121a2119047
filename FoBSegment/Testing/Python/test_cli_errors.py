"""Bad input: a clear one-paragraph error, a non-zero exit, no traceback, no output file."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib.cli import main

REPO = Path(__file__).resolve().parents[3]


def _write(path, arr, spacing=None, origin=None):
    img = sitk.GetImageFromArray(arr)
    if spacing:
        img.SetSpacing(spacing)
    if origin:
        img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def case(tmp_path):
    """A small realistic case: a crop of the example CT and its liver label."""
    ct = sitk.ReadImage(str(REPO / "FoBSegment/Testing/Data/example_ct.nii.gz"))
    lab = sitk.ReadImage(str(REPO / "FoBSegment/Testing/Data/example_seg.nii.gz"))
    ct, lab = ct[:, :, 85:95], lab[:, :, 85:95]
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(lab, str(tmp_path / "lab.nii.gz"))
    return tmp_path


def _run(argv, capsys, out: Path):
    """Run the command line on bad input: refused with exit 2, before any slice is segmented."""
    from unittest import mock

    from FoBSegmentLib.pipeline.segmenter import Segmenter

    def work_started(*a, **k):
        raise AssertionError("the input was refused only after the work had started")

    with mock.patch.object(Segmenter, "segment", work_started), \
            mock.patch.object(Segmenter, "segment_atlas", work_started), \
            mock.patch.object(Segmenter, "refine", work_started):
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, "bad input gives exit 2"
    assert "Traceback" not in err
    assert err.startswith("fobsegment: error:")
    assert not out.exists(), "no output file may be left behind"
    assert not list(out.parent.glob(".fobsegment-*")), "no temporary output may be left behind"
    return err


def _seg(case, **kw):
    argv = ["segment", "--volume", str(kw.pop("volume", case / "ct.nii.gz")),
            "--support-mask", str(kw.pop("mask", case / "lab.nii.gz")), "--output", str(kw.pop("out", case / "out.nii.gz"))]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def test_empty_support_mask(case, capsys):
    lab = sitk.ReadImage(str(case / "lab.nii.gz"))
    _write(case / "empty.nii.gz", np.zeros_like(sitk.GetArrayFromImage(lab)))
    e = sitk.ReadImage(str(case / "empty.nii.gz"))
    e.CopyInformation(lab)
    sitk.WriteImage(e, str(case / "empty.nii.gz"))
    err = _run(_seg(case, mask=case / "empty.nii.gz"), capsys, case / "out.nii.gz")
    assert "empty" in err and "Paint" in err


def test_label_not_present(case, capsys):
    err = _run(_seg(case, label=99), capsys, case / "out.nii.gz")
    assert "Label 99 is not present" in err and re.search(r"it holds \[[0-9, ]*\b5\b[0-9, ]*\]", err)


def test_several_labels_need_a_choice(case, capsys):
    err = _run(_seg(case), capsys, case / "out.nii.gz")
    assert "--label" in err


def test_segment_name_not_present(case, capsys, tmp_path):
    from FoBSegmentLib.io import read_volume, write_result

    ct = read_volume(case / "ct.nii.gz")
    lab = np.rint(read_volume(case / "lab.nii.gz").array) == 5
    write_result(case / "support.seg.nrrd", ct, lab, name="liver", color=(1, 0, 0))
    err = _run(_seg(case, mask=case / "support.seg.nrrd", segment="spleen"), capsys, case / "out.nii.gz")
    assert "No segment named 'spleen'" in err and "liver" in err


def test_support_slice_out_of_range(case, capsys):
    err = _run(_seg(case, label=5, support_slices="3,400"), capsys, case / "out.nii.gz")
    assert "out of range" in err and "400" in err


def test_support_slice_without_annotation(case, capsys):
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lab.nii.gz")))
    assert (lab[0] == 5).any()  # fixture sanity: slice 0 is annotated in the crop
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lab.nii.gz")))
    arr[1:] = 0
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(sitk.ReadImage(str(case / "lab.nii.gz")))
    sitk.WriteImage(img, str(case / "one.nii.gz"))
    err = _run(_seg(case, mask=case / "one.nii.gz", label=5, support_slices="4"), capsys, case / "out.nii.gz")
    assert "carry no annotation" in err


def test_2d_image(case, capsys):
    _write(case / "flat.nii.gz", np.zeros((32, 32), np.int16))
    err = _run(_seg(case, volume=case / "flat.nii.gz", label=5), capsys, case / "out.nii.gz")
    assert "2D" in err


def test_4d_image(case, capsys):
    img = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))] * 3)
    sitk.WriteImage(img, str(case / "cine.nii.gz"))
    err = _run(_seg(case, volume=case / "cine.nii.gz", label=5), capsys, case / "out.nii.gz")
    assert "4D" in err and "frame" in err


def test_nan_voxels(case, capsys):
    ct = sitk.ReadImage(str(case / "ct.nii.gz"))
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    arr[3, 10, 10] = np.nan
    arr[4, 11, 11] = np.inf
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ct)
    sitk.WriteImage(img, str(case / "nan.nrrd"))
    err = _run(_seg(case, volume=case / "nan.nrrd", label=5), capsys, case / "out.nii.gz")
    assert "2 NaN or infinite" in err


def test_support_mask_on_another_grid(case, capsys):
    lab = sitk.ReadImage(str(case / "lab.nii.gz"))
    lab.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(lab, str(case / "moved.nii.gz"))
    err = _run(_seg(case, mask=case / "moved.nii.gz", label=5), capsys, case / "out.nii.gz")
    assert "not on the support image's grid" in err


def test_truncated_file(case, capsys):
    data = (case / "ct.nii.gz").read_bytes()
    (case / "cut.nii.gz").write_bytes(data[: len(data) // 3])
    err = _run(_seg(case, volume=case / "cut.nii.gz", label=5), capsys, case / "out.nii.gz")
    assert "unreadable, truncated" in err


def test_missing_file(case, capsys):
    err = _run(_seg(case, volume=case / "nope.nii.gz", label=5), capsys, case / "out.nii.gz")
    assert "does not exist" in err


def test_unknown_backbone(case, capsys):
    err = _run(_seg(case, label=5, backbone="sam_vit_x"), capsys, case / "out.nii.gz")
    assert "Unknown backbone 'sam_vit_x'" in err and "litemedsam" in err


def test_output_folder_missing(case, capsys):
    out = case / "no" / "such" / "out.nii.gz"
    err = _run(_seg(case, label=5, out=out), capsys, out)
    assert "does not exist" in err


def test_corrupt_embedded_weights(case, capsys, monkeypatch, tmp_path):
    """The embedded LiteMedSAM file failing its SHA-256 is refused, not loaded."""
    from FoBSegmentLib.backbones import litemedsam

    real, sha = litemedsam.embedded_checkpoint()
    bad = tmp_path / "lite_medsam.pth"
    data = bytearray(real.read_bytes())
    data[1000] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(litemedsam, "embedded_checkpoint", lambda: (bad, sha))
    litemedsam._VERIFIED.clear()
    err = _run(_seg(case, label=5), capsys, case / "out.nii.gz")
    assert "SHA-256" in err and "corrupt" in err


def test_sam_checkpoint_with_wrong_checksum(case, capsys, tmp_path):
    fake = tmp_path / "sam_vit_b_01ec64.pth"
    fake.write_bytes(b"not the real checkpoint" * 100)
    err = _run(_seg(case, label=5, backbone="sam_vit_b", checkpoint=fake), capsys, case / "out.nii.gz")
    assert "is not the official 'sam_vit_b' checkpoint" in err


def test_console_script_prints_no_traceback(case):
    exe = Path(sys.executable).with_name("fobsegment")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "FoBSegmentLib.cli"]
    r = subprocess.run(cmd + _seg(case, label=42), capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "Label 42 is not present" in r.stderr
    assert not (case / "out.nii.gz").exists()


@pytest.mark.parametrize("within,message", [("rv:liver", "'rv', which is not one of the classes"),
                                            ("liver", "pair must look like rv:lv_bp"),
                                            ("liver:spleen,spleen:liver", "not itself kept within")])
def test_evaluate_within_that_cannot_hold(case, capsys, within, message):
    out = case / "results.json"
    argv = ["evaluate", "--data", str(case), "--classes", "liver=5,spleen=1", "--support-case", "1",
            "--cases", "2", "--protocol", "full", "--json", str(out), "--within", within]
    assert message in _run(argv, capsys, out)


def test_segment_within_a_file_of_several_structures(case, capsys):
    """``--within`` bounds by one structure: a labelmap of several organs is refused before any work."""
    out = case / "out.nii.gz"
    err = _run(_seg(case, label=5, within=case / "lab.nii.gz"), capsys, out)
    assert "holds several labels" in err and "one structure's result" in err


def _evaluation_data(case):
    """``case`` laid out as an evaluation folder: image_N / label_N for cases 1 and 2."""
    for n in ("1", "2"):
        (case / f"image_{n}.nii.gz").write_bytes((case / "ct.nii.gz").read_bytes())
        (case / f"label_{n}.nii.gz").write_bytes((case / "lab.nii.gz").read_bytes())
    return case


@pytest.mark.parametrize("inp", ["volume", "previous", "corrected"])
def test_refine_never_writes_over_an_input(case, capsys, inp):
    """Every input of ``refine``, given again as its output, is refused before any work and is
    left as it was."""
    files = {"volume": case / "ct.nii.gz", "previous": case / "prev.nii.gz", "corrected": case / "fixed.nii.gz"}
    liver = (sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lab.nii.gz"))) == 5).astype(np.uint8)
    ref = sitk.ReadImage(str(case / "ct.nii.gz"))
    for name in ("previous", "corrected"):
        img = sitk.GetImageFromArray(liver)
        img.CopyInformation(ref)
        sitk.WriteImage(img, str(files[name]))
    before = files[inp].read_bytes()
    argv = ["refine", "--volume", str(files["volume"]), "--previous", str(files["previous"]), "--corrected",
            str(files["corrected"]), "--output", str(files[inp])]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "writing it would replace that input" in err
    assert files[inp].read_bytes() == before


@pytest.mark.parametrize("json_name,message", [("label_2.nii.gz", "would replace that input"),
                                               ("sub", "is a folder")])
def test_evaluate_json_checked_before_any_work(case, capsys, json_name, message):
    """``--json`` naming an input or a folder is refused before the evaluation runs (nothing
    printed but the error), and the input is untouched."""
    data = _evaluation_data(case)
    (data / "sub").mkdir()
    before = (data / "label_2.nii.gz").read_bytes()
    code = main(["evaluate", "--data", str(data), "--classes", "liver=5", "--support-case", "1", "--cases", "2",
                 "--json", str(data / json_name)])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err and "Traceback" not in captured.err
    assert "Dice" not in captured.out, "refused before any case ran"
    assert (data / "label_2.nii.gz").read_bytes() == before


@pytest.mark.parametrize("classes,cases,message", [("liver=5,liver=1", "2", "names 'liver' twice"),
                                                   ("liver=5", "1", "No query case")])
def test_evaluate_classes_and_cases_that_say_nothing_or_two_things(case, capsys, classes, cases, message):
    data = _evaluation_data(case)
    code = main(["evaluate", "--data", str(data), "--classes", classes, "--support-case", "1", "--cases", cases])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_cache_folder_that_is_a_file(case, capsys):
    err = _run(_seg(case, label=5, cache_dir=case / "lab.nii.gz"), capsys, case / "out.nii.gz")
    assert "is a file, not a folder" in err


def test_segmentation_drawn_on_another_image(case, capsys):
    """A ``.seg.nrrd`` whose grid is not part of the support image's is refused (a labelmap on
    another grid is too); one that stores only its segment's extent of the image is read."""
    from FoBSegmentLib import read_support_mask, read_volume, write_result

    ct = read_volume(case / "ct.nii.gz")
    liver = np.rint(read_volume(case / "lab.nii.gz").array) == 5
    write_result(case / "liver.seg.nrrd", ct, liver, name="liver")
    assert read_support_mask(case / "liver.seg.nrrd", ct).mask.sum() == liver.sum()
    moved = sitk.ReadImage(str(case / "ct.nii.gz"))
    moved.SetOrigin(tuple(o + 0.37 * s for o, s in zip(moved.GetOrigin(), moved.GetSpacing())))
    sitk.WriteImage(moved, str(case / "other.nii.gz"))
    err = _run(_seg(case, volume=case / "other.nii.gz", mask=case / "liver.seg.nrrd"), capsys, case / "out.nii.gz")
    assert "was not drawn on the support image" in err


def test_demo_volume_needs_its_labels(case, capsys):
    out = case / "demo"
    code = main(["demo", "--volume", str(case / "ct.nii.gz"), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--volume and --labels together" in err and "Traceback" not in err
    other = sitk.ReadImage(str(case / "lab.nii.gz"))[:, :, :5]
    sitk.WriteImage(other, str(case / "short.nii.gz"))
    code = main(["demo", "--volume", str(case / "ct.nii.gz"), "--labels", str(case / "short.nii.gz"),
                 "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not on the grid" in err
    assert not out.exists(), "nothing created for a refused demo"


def test_output_the_format_cannot_hold_is_refused_first(case, capsys):
    """A sheared query for a NIfTI output, and an ``.mhd`` output, are refused before the work
    (the writer would refuse them too, but only after the whole run)."""
    from FoBSegmentLib import Volume, read_volume, write_result

    ct = read_volume(case / "ct.nii.gz")
    d = np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1.0]])
    sheared = Volume(ct.array, ct.spacing, ct.origin, d / np.linalg.norm(d, axis=0))
    write_result(case / "sheared.nrrd", sheared, np.ones(ct.array.shape, bool))  # any content: a grey volume
    liver = np.rint(read_volume(case / "lab.nii.gz").array) == 5
    write_result(case / "sheared_liver.nrrd", sheared, liver)
    err = _run(_seg(case, volume=case / "sheared.nrrd", mask=case / "sheared_liver.nrrd"), capsys, case / "out.nii.gz")
    assert "NIfTI cannot store it" in err
    err = _run(_seg(case, label=5, out=case / "out.mhd"), capsys, case / "out.mhd")
    assert "Unsupported output format" in err


def test_write_protected_outputs_are_refused_before_the_work(case, capsys, monkeypatch):
    """The demo's result and an evaluation's --json, where they exist write-protected, and a
    cache folder variable naming a file: refused before any segmentation."""
    demo = case / "demo"
    demo.mkdir()
    (demo / "demo_result.seg.nrrd").write_bytes(b"kept")
    os.chmod(demo / "demo_result.seg.nrrd", 0o444)
    code = main(["demo", "--output-dir", str(demo)])
    assert code == 2 and "write-protected" in capsys.readouterr().err
    data = _evaluation_data(case)
    (data / "r.json").write_text("{}")
    os.chmod(data / "r.json", 0o444)
    err = _run(["evaluate", "--data", str(data), "--classes", "liver=5", "--support-case", "1", "--cases", "2",
                "--json", str(data / "r.json")], capsys, data / "absent.json")
    assert "write-protected" in err and (data / "r.json").read_text() == "{}"
    monkeypatch.setenv("FOBSEGMENT_CACHE_DIR", str(case / "lab.nii.gz"))
    err = _run(_seg(case, label=5), capsys, case / "out.nii.gz")
    assert "is a file, not a folder" in err

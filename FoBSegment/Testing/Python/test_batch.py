"""Batch segmentation of a cohort (FoBSegmentLib.batch): resumable, isolated, shardable, on Dask."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TEST_DATA
from FoBSegmentLib import CancelledError, FoBInputError, read_support_mask, read_volume, write_result
from FoBSegmentLib.batch import parse_shard, read_manifest, run_batch, shard_cases


@pytest.fixture()
def cohort(tmp_path):
    """Four small real volumes (crops of the example CT around the spleen), each with one
    painted spleen slice and its reference; the third case's support mask is empty."""
    img = sitk.ReadImage(str(TEST_DATA / "example_ct.nii.gz"))
    lab = sitk.ReadImage(str(TEST_DATA / "example_seg.nii.gz"))
    rows = []
    for n, z0 in enumerate((95, 97, 99, 101)):
        q = tmp_path / f"q{n}.nii.gz"
        r = tmp_path / f"ref{n}.nii.gz"
        sitk.WriteImage(img[:, :, z0:z0 + 6], str(q))
        sitk.WriteImage(lab[:, :, z0:z0 + 6], str(r))
        vol = read_volume(q)
        spleen = np.rint(read_volume(r).array) == 1
        painted = np.zeros(spleen.shape, np.uint8)
        if n != 2:
            painted[3] = spleen[3]
        m = tmp_path / f"m{n}.nii.gz"
        write_result(m, vol, painted) if painted.any() else sitk.WriteImage(
            sitk.Cast(sitk.ReadImage(str(r)) * 0, sitk.sitkUInt8), str(m))
        rows.append({"id": f"case{n}", "query": q.name, "support_mask": m.name, "reference": r.name,
                     "reference_label": "1"})
    manifest = tmp_path / "cases.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    out.mkdir()
    return manifest, out, rows


def test_manifest_rows_shards_and_errors(tmp_path, cohort):
    manifest, _, _ = cohort
    cases = read_manifest(manifest)
    assert [c.id for c in cases] == ["case0", "case1", "case2", "case3"]
    assert cases[0].query == manifest.parent / "q0.nii.gz" and cases[0].output == "case0.seg.nrrd"
    assert [c.id for c in shard_cases(cases, parse_shard("1/2"))] == ["case1", "case3"]
    together = sorted(c.id for i in range(3) for c in shard_cases(cases, (i, 3)))
    assert together == sorted(c.id for c in cases), "shards cover every case exactly once"
    with pytest.raises(FoBInputError, match="I/N"):
        parse_shard("2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a.nii.gz"}\n')
    with pytest.raises(FoBInputError, match="support_mask"):
        read_manifest(bad)


def test_batch_isolates_a_broken_case_stops_cleanly_and_resumes(cohort, litemedsam):
    manifest, out, rows = cohort
    options = {"backbone": litemedsam}
    # Interrupt during the second case: the first stays written, nothing of the second.
    slices = []

    def cancel_in_case1():
        return len(slices) >= 1 and (out / "case0.seg.nrrd").is_file()

    with pytest.raises(CancelledError):
        run_batch(manifest, out, options, progress=lambda d, t: slices.append(d), is_cancelled=cancel_in_case1)
    assert (out / "case0.seg.nrrd").is_file() and not (out / "case1.seg.nrrd").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".fobsegment-")], "no partial output"
    first_bytes = (out / "case0.seg.nrrd").read_bytes()

    seen = []
    totals = run_batch(manifest, out, options, on_case=seen.append)
    status = {r.id: r.status for r in seen}
    assert status == {"case0": "skipped", "case1": "ok", "case2": "failed", "case3": "ok"}
    assert (out / "case0.seg.nrrd").read_bytes() == first_bytes, "a finished case is not redone"
    assert totals["ok"] == 2 and totals["skipped"] == 1 and totals["failed"] == 1 and totals["not_run"] == 0
    # The broken case's message is the input error's own message.
    with pytest.raises(FoBInputError) as err:
        read_support_mask(manifest.parent / "m2.nii.gz", read_volume(manifest.parent / "q2.nii.gz"))
    summary = json.loads((out / "summary.json").read_text())
    by_id = {r["id"]: r for r in summary["cases"]}
    assert by_id["case2"]["message"] == str(err.value)
    assert by_id["case1"]["dice"] > 0.8 and by_id["case3"]["slices_kept"] >= 1
    assert list(csv.DictReader(open(out / "summary.csv")))[1]["status"] == "ok"
    # A changed output is not trusted: it is segmented again.
    (out / "case3.seg.nrrd").write_bytes(b"damaged")
    again = []
    run_batch(manifest, out, options, on_case=again.append)
    assert {r.id: r.status for r in again}["case3"] == "ok"
    assert read_support_mask(out / "case3.seg.nrrd", read_volume(manifest.parent / "q3.nii.gz")).mask.any()


def test_dask_engine_on_two_local_workers(cohort, tmp_path):
    pytest.importorskip("dask.distributed")
    manifest, out, _ = cohort
    seen = []
    totals = run_batch(manifest, out, {"backbone": "litemedsam", "device": "cpu", "cache_dir": str(tmp_path / "c")},
                       engine="dask", workers=2, on_case=seen.append)
    assert totals["ok"] == 3 and totals["failed"] == 1, [(r.id, r.status, r.message) for r in seen]
    assert sorted(r.id for r in seen if r.status == "ok") == ["case0", "case1", "case3"]
    assert all((out / f"case{n}.seg.nrrd").is_file() for n in (0, 1, 3))


def test_manifest_support_slices_and_oracle(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"query": "q.nii.gz", "support_mask": "s.nii.gz", "reference": "r.nii.gz", '
                 '"support_slices": "12 18;24", "oracle": "true"}\n'
                 '{"query": "q.nii.gz", "support_mask": "s.nii.gz", "support_slices": [3, 4]}\n')
    a, b = read_manifest(m)
    assert a.support_slices == (12, 18, 24) and a.oracle and b.support_slices == (3, 4) and not b.oracle
    m.write_text('{"query": "q.nii.gz", "support_mask": "s.nii.gz", "oracle": "yes"}\n')
    with pytest.raises(FoBInputError, match="oracle needs a reference"):
        read_manifest(m)
    m.write_text('{"query": "q.nii.gz", "support_mask": "s.nii.gz", "support_slices": "twelve"}\n')
    with pytest.raises(FoBInputError, match="support_slices must be slice numbers"):
        read_manifest(m)


def test_evaluate_is_a_batch_with_references(tmp_path, litemedsam):
    """``evaluate`` runs its cases through the batch: the Dice is that of a direct Segmenter run,
    a broken query is recorded with its input error's message while the rest go on, and with an
    output folder the same evaluation again resumes from the verified outputs."""
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.evaluation import dice, ep1_support_slices, evaluate
    from FoBSegmentLib.geometry import SliceView, occupied_slices

    img = sitk.ReadImage(str(TEST_DATA / "example_ct.nii.gz"))
    lab = sitk.ReadImage(str(TEST_DATA / "example_seg.nii.gz"))
    data = tmp_path / "data"
    data.mkdir()
    for case, z0 in (("1", 95), ("2", 97), ("3", 99)):
        sitk.WriteImage(img[:, :, z0:z0 + 6], str(data / f"image_{case}.nii.gz"))
        sitk.WriteImage(lab[:, :, z0:z0 + 6], str(data / f"label_{case}.nii.gz"))
    (data / "image_3.nii.gz").write_bytes(b"not a volume")  # its label is fine: the case is listed, then fails
    seg = Segmenter(litemedsam)
    out = tmp_path / "out"
    out.mkdir()
    r = evaluate(data, {"spleen": 1}, "1", ["2", "3"], "ep1", segmenter=seg, output_dir=out)

    s_vol, q_vol = read_volume(data / "image_1.nii.gz"), read_volume(data / "image_2.nii.gz")
    s_mask = np.rint(read_volume(data / "label_1.nii.gz").array) == 1
    gt = np.rint(read_volume(data / "label_2.nii.gz").array) == 1
    direct = seg.segment(q_vol, s_vol, s_mask, support_slices=ep1_support_slices(SliceView.for_volume(s_vol).to_stack(s_mask)),
                         query_slices=occupied_slices(SliceView.for_volume(q_vol).to_stack(gt)))
    assert r["classes"]["spleen"]["cases"] == {"2": round(dice(direct.mask > 0, gt), 4)}
    assert r["classes"]["spleen"]["cases"]["2"] > 0.8 and r["failed"] == 1
    with pytest.raises(FoBInputError) as err:
        read_volume(data / "image_3.nii.gz", "query volume of case spleen-3")
    assert r["classes"]["spleen"]["failed"] == {"3": str(err.value)}
    assert (out / "spleen_2.seg.nrrd").is_file() and (out / "summary.json").is_file()

    again = evaluate(data, {"spleen": 1}, "1", ["2", "3"], "ep1", segmenter=seg, output_dir=out)
    status = {row["id"]: row["status"] for row in json.loads((out / "summary.json").read_text())["cases"]}
    assert status == {"spleen-2": "skipped", "spleen-3": "failed"}
    assert again["classes"]["spleen"]["cases"] == r["classes"]["spleen"]["cases"] and again["slices_encoded"] == 0
    # Another protocol into the same folder is another recipe: segmented again, not reported as done.
    full = evaluate(data, {"spleen": 1}, "1", ["2", "3"], "full", segmenter=seg, output_dir=out)
    status = {row["id"]: row["status"] for row in json.loads((out / "summary.json").read_text())["cases"]}
    assert status == {"spleen-2": "ok", "spleen-3": "failed"} and full["protocol"] == "full"


def test_manifest_atlas_of_several_supports(cohort, tmp_path, litemedsam):
    """A row with several support volumes and masks ('|'-separated) is an atlas: the case is
    segmented once per support and the masks fused (its Dice equals Segmenter.segment_atlas's)."""
    manifest, out, rows = cohort
    atlas = tmp_path / "atlas.jsonl"
    atlas.write_text(json.dumps({"id": "a", "query": "q0.nii.gz", "support_volume": "q1.nii.gz|q3.nii.gz",
                                 "support_mask": "m1.nii.gz|m3.nii.gz", "reference": "ref0.nii.gz",
                                 "reference_label": 1}) + "\n"
                     + json.dumps({"id": "b", "query": "q0.nii.gz", "support_volume": ["q1.nii.gz", "q3.nii.gz"],
                                   "support_mask": ["m1.nii.gz", "m3.nii.gz"], "atlas_fusion": "consensus"}) + "\n")
    cases = read_manifest(atlas)
    assert cases[0].support_volume == tmp_path / "q1.nii.gz" and cases[0].support_mask == tmp_path / "m1.nii.gz"
    assert cases[0].more_supports == ((tmp_path / "q3.nii.gz", tmp_path / "m3.nii.gz"),)
    assert cases[0].atlas_fusion is None and cases[1].atlas_fusion == "consensus"  # None: the settings' default
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.evaluation import dice

    seg = Segmenter(litemedsam)
    summary = run_batch(cases[:1], out, segmenter=seg)

    q0 = read_volume(tmp_path / "q0.nii.gz")
    supports = [(read_volume(tmp_path / f"q{n}.nii.gz"), read_support_mask(tmp_path / f"m{n}.nii.gz",
                                                                           read_volume(tmp_path / f"q{n}.nii.gz")).mask)
                for n in (1, 3)]
    direct = seg.segment_atlas(q0, supports)
    ref = np.rint(read_volume(tmp_path / "ref0.nii.gz").array) == 1
    row = json.loads((out / "summary.jsonl").read_text().splitlines()[0])
    assert row["status"] == "ok" and row["dice"] == round(dice(direct.mask, ref), 4) and row["dice"] > 0.7
    assert summary["ok"] == 1
    for text, msg in (('{"query": "q0.nii.gz", "support_volume": "q1.nii.gz", "support_mask": "m1.nii.gz|m3.nii.gz"}',
                       "one support_volume per support_mask"),
                      ('{"query": "q0.nii.gz", "support_volume": "q1.nii.gz|q3.nii.gz", "support_mask": '
                       '"m1.nii.gz|m3.nii.gz", "support_slices": "3"}', "support_slices names slices of one"),
                      ('{"query": "q0.nii.gz", "support_volume": "q1.nii.gz|q3.nii.gz", "support_mask": '
                       '"m1.nii.gz|m3.nii.gz", "atlas_fusion": "mean"}', "atlas_fusion must be one of")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text + "\n")
        with pytest.raises(FoBInputError, match=msg):
            read_manifest(bad)


def test_manifest_within_names_an_earlier_case_of_the_same_query(tmp_path):
    m = tmp_path / "m.jsonl"
    row = '{{"id": "{id}", "query": "{q}", "support_mask": "s.nii.gz"{extra}}}\n'
    m.write_text(row.format(id="lv", q="q.nii.gz", extra="") +
                 row.format(id="rv", q="q.nii.gz", extra=', "within": "lv", "output": "rv.nrrd"'))
    lv, rv = read_manifest(m)
    assert lv.within is None and (rv.within, rv.within_output) == ("lv", "lv.seg.nrrd")
    for rows, message in (
            ([("rv", "q.nii.gz", ', "within": "lv"'), ("lv", "q.nii.gz", "")], "id of an earlier row"),
            ([("lv", "q.nii.gz", ""), ("rv", "other.nii.gz", ', "within": "lv"')], "on another query"),
            ([("a", "q.nii.gz", ""), ("b", "q.nii.gz", ', "within": "a"'), ("c", "q.nii.gz", ', "within": "b"')],
             "itself kept within")):
        m.write_text("".join(row.format(id=i, q=q, extra=e) for i, q, e in rows))
        with pytest.raises(FoBInputError, match=message):
            read_manifest(m)


def test_batch_keeps_a_case_within_anothers_slices(tmp_path, litemedsam):
    """A case with ``within`` keeps only the slices between the first and last slice of the
    named case's result: on a real CT crop the spleen walked through the volume is cut to the
    five slices an oracle run segmented, and is the unbounded run's result on those slices.
    Its bound computed again, it is computed again; run alone (the bound's result missing) it
    fails with what to do, writing nothing."""
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.geometry import SliceView, occupied_slices

    img = sitk.ReadImage(str(TEST_DATA / "example_ct.nii.gz"))
    lab = sitk.ReadImage(str(TEST_DATA / "example_seg.nii.gz"))
    sitk.WriteImage(img[:, :, 86:100], str(tmp_path / "q.nii.gz"))
    q = read_volume(tmp_path / "q.nii.gz")
    spleen = np.rint(sitk.GetArrayFromImage(lab[:, :, 86:100])) == 1
    painted = np.zeros(spleen.shape, np.uint8)
    painted[7] = spleen[7]
    write_result(tmp_path / "painted.nii.gz", q, painted)
    part = np.zeros(spleen.shape, np.uint8)
    part[5:10] = spleen[5:10]
    write_result(tmp_path / "part.nii.gz", q, part)
    row = '{{"id": "{id}", "query": "q.nii.gz", "support_mask": "painted.nii.gz"{extra}}}\n'
    m = tmp_path / "cases.jsonl"
    m.write_text(row.format(id="part", extra=', "reference": "part.nii.gz", "oracle": true') +
                 row.format(id="free", extra="") + row.format(id="bounded", extra=', "within": "part"'))
    out = tmp_path / "out"
    out.mkdir()
    seg = Segmenter(litemedsam)
    totals = run_batch(m, out, segmenter=seg)
    assert totals["ok"] == 3
    view = SliceView.for_volume(q)
    got = {c: view.to_stack(read_support_mask(out / f"{c}.seg.nrrd", q).mask) for c in ("part", "free", "bounded")}
    lo, hi = occupied_slices(got["part"])[0], occupied_slices(got["part"])[-1]
    assert hi - lo == 4
    assert [i for i in occupied_slices(got["free"]) if not lo <= i <= hi], "the unbounded walk must pass the bound"
    assert occupied_slices(got["bounded"]) == [i for i in occupied_slices(got["free"]) if lo <= i <= hi]
    np.testing.assert_array_equal(got["bounded"][lo:hi + 1], got["free"][lo:hi + 1])
    summary = json.loads((out / "summary.json").read_text())["cases"]
    kept = {r["id"]: r["slices_kept"] for r in summary}
    assert kept["bounded"] == len(occupied_slices(got["bounded"])) < kept["free"]
    # the bound computed again (its output lost): the case it bounds is computed again too
    (out / "part.seg.nrrd").unlink()
    run_batch(m, out, segmenter=seg)
    status = {r["id"]: r["status"] for r in json.loads((out / "summary.json").read_text())["cases"]}
    assert status == {"part": "ok", "free": "skipped", "bounded": "ok"}

    alone = tmp_path / "alone"
    alone.mkdir()
    run_batch([c for c in read_manifest(m) if c.id == "bounded"], alone, segmenter=seg)
    row = json.loads((alone / "summary.json").read_text())["cases"][0]
    assert row["status"] == "failed" and "run case part first" in row["message"]
    assert not (alone / "bounded.seg.nrrd").exists()


def test_within_pairs_as_typed_in_the_panel_or_on_the_command_line():
    from FoBSegmentLib.evaluation import parse_within as parse_classes_within
    from FoBSegmentLib.geometry import parse_within

    assert parse_within(" RV : LV blood pool ; myocardium: LV blood pool ") == {
        "RV": "LV blood pool", "myocardium": "LV blood pool"}
    assert parse_classes_within("rv:lv_bp", {"lv_bp": 500, "rv": 600}) == {"rv": "lv_bp"}
    assert parse_within("") == {} and parse_within(None) == {}
    with pytest.raises(FoBInputError, match="pair must look like"):
        parse_within("RV LV blood pool")
    with pytest.raises(FoBInputError, match="not one of the classes"):
        parse_classes_within("rv:lv", {"lv_bp": 500, "rv": 600})


def test_manifest_cells_that_would_be_misread(tmp_path):
    """A fractional label, a JSON line that is not an object, a row with surplus cells and a
    manifest that is not text are refused with the row and the reason, not truncated or crashed on."""
    cases = {
        "frac.csv": ("query,support_mask,label\nq.nii.gz,m.nii.gz,4.9\n", "label must be an integer"),
        "scalar.jsonl": ('{"query": "q.nii.gz", "support_mask": "m.nii.gz"}\n42\n', "Line 2 .* not a JSON object"),
        "surplus.csv": ("query,support_mask\nq.nii.gz,m.nii.gz,extra\n", "more cells than the header"),
        "binary.csv": (None, "not a text file"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe binary")
        else:
            path.write_text(text)
        with pytest.raises(FoBInputError, match=message):
            read_manifest(path)
    ok = tmp_path / "whole.csv"
    ok.write_text("query,support_mask,label\nq.nii.gz,m.nii.gz,4.0\n")
    assert read_manifest(ok)[0].label == 4


def test_a_changed_case_is_not_reported_as_done(cohort, litemedsam):
    """Resuming reuses an output only under the same recipe: a row pointing at another support,
    an input re-written (newer modification time) or another model runs again."""
    import os

    manifest, out, rows = cohort
    options = {"backbone": litemedsam}
    run_batch(manifest, out, options)
    changed = [{**r, "label": "1" if r["id"] == "case1" else ""} for r in rows]  # case1 names its label now
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, list(changed[0]))
        w.writeheader()
        w.writerows(changed)
    q3 = manifest.parent / "q3.nii.gz"
    st = q3.stat()
    os.utime(q3, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    seen = []
    run_batch(manifest, out, options, on_case=seen.append)
    status = {r.id: r.status for r in seen}
    assert status == {"case0": "skipped", "case1": "ok", "case2": "failed", "case3": "ok"}
    again = []
    run_batch(manifest, out, {"backbone": "no_such_backbone"}, on_case=again.append)
    assert {r.id: r.status for r in again} == {f"case{n}": "failed" for n in range(4)}
    assert "Unknown backbone" in again[0].message


def test_batch_command_exits_1_when_a_case_failed(cohort, capsys):
    """On the command line a batch with a failed case exits 1 (for a script or a Slurm array to
    notice) and names the case and its reason; the others are written."""
    from FoBSegmentLib.cli import main

    manifest, out, rows = cohort
    cache = out.parent / "cache"
    code = main(["batch", "--manifest", str(manifest), "--output-dir", str(out), "--cache-dir", str(cache)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "case2: failed (" in printed and "empty" in printed
    assert "totals: cases 4, ok 3, skipped 0, failed 1" in printed
    assert all((out / f"case{n}.seg.nrrd").is_file() for n in (0, 1, 3))


def test_manifest_outputs_may_not_collide_or_replace_inputs(tmp_path, cohort):
    """Two rows with one output (they would overwrite each other on every resume) are refused;
    so is an output that would replace another row's input when the output folder is the
    manifest's own."""
    manifest, _, rows = cohort
    twice = tmp_path / "twice.csv"
    twice.write_text("id,query,support_mask,output\na,q0.nii.gz,m0.nii.gz,r.seg.nrrd\n"
                     "b,q1.nii.gz,m1.nii.gz,R.seg.nrrd\n")
    with pytest.raises(FoBInputError, match="also case 'a'"):
        read_manifest(twice)
    over = tmp_path / "over.csv"
    over.write_text("id,query,support_mask,output\na,q0.nii.gz,m0.nii.gz,m1.nii.gz\nb,q1.nii.gz,m1.nii.gz,\n")
    before = (tmp_path / "m1.nii.gz").read_bytes()
    with pytest.raises(FoBInputError, match="would replace that input"):
        run_batch(over, tmp_path, {"backbone": "litemedsam"})
    assert (tmp_path / "m1.nii.gz").read_bytes() == before and not (tmp_path / "summary.jsonl").exists()
    frac = tmp_path / "frac.jsonl"
    frac.write_text('{"query": "q0.nii.gz", "support_mask": "m0.nii.gz", "support_slices": [40.7, 45]}\n')
    with pytest.raises(FoBInputError, match="support_slices must be slice numbers"):
        read_manifest(frac)


def test_recipe_is_the_same_for_a_given_or_a_built_segmenter(cohort, litemedsam):
    """An evaluation resumed under the other engine (a built Segmenter or options) reuses its
    outputs; another checkpoint or other settings do not."""
    from FoBSegmentLib import Segmenter
    from FoBSegmentLib.batch import case_recipe
    from FoBSegmentLib.settings import DEFAULT_SETTINGS

    manifest, _, _ = cohort
    case = read_manifest(manifest)[0]
    options = {"backbone": "litemedsam", "device": "cpu", "cache_dir": "/somewhere"}
    given = case_recipe(case, {**options, "device": "auto"}, Segmenter(litemedsam))
    assert given == case_recipe(case, options) == case_recipe(case, {"backbone": litemedsam})
    assert case_recipe(case, {**options, "checkpoint": str(manifest)}) != given
    assert case_recipe(case, {**options, "settings": DEFAULT_SETTINGS.with_changes(**{"walk.pad_px": 6.0})}) != given

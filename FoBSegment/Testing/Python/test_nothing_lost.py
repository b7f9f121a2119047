"""Nothing lost: outputs, cache and checkpoints under faults and hostile paths."""

from __future__ import annotations

import errno
import logging
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from conftest import one_slice_support
from FoBSegmentLib import FoBInputError, Segmenter, Volume, read_support_mask, read_volume, write_result, write_segments
from FoBSegmentLib.cli import main
from FoBSegmentLib.embedding_cache import DecodeCache, EmbeddingCache
from FoBSegmentLib.errors import CheckpointError


@pytest.fixture()
def small(tmp_path):
    """A small real volume (a crop of the example CT) and a file holding it."""
    from conftest import TEST_DATA

    img = sitk.ReadImage(str(TEST_DATA / "example_ct.nii.gz"))[:, :, 90:96]
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(img, str(path))
    return read_volume(path), path


def _mask(vol):
    m = np.zeros(vol.array.shape, np.uint8)
    m[2, 40:60, 40:60] = 1
    return m


# 1 ------------------------------------------------------------------ output == input
def test_output_that_is_an_input_is_refused(small, tmp_path, capsys):
    vol, path = small
    sup = write_result(tmp_path / "sup.nii.gz", vol, _mask(vol))
    before = path.read_bytes(), sup.read_bytes()
    (tmp_path / "link.nii.gz").symlink_to(path)
    (tmp_path / "sub").mkdir()
    for out in (path, tmp_path / "link.nii.gz", tmp_path / "sub" / ".." / "ct.nii.gz", sup):
        code = main(["segment", "--volume", str(path), "--support-mask", str(sup), "--output", str(out)])
        assert code == 2 and "would replace that input" in capsys.readouterr().err
    assert (path.read_bytes(), sup.read_bytes()) == before


# 2 ------------------------------------------------------------------ full disk
@pytest.mark.parametrize("name", ["r.nii.gz", "r.nii", "r.nrrd", "r.mha"])
def test_full_disk_keeps_the_old_result_and_says_so(small, tmp_path, monkeypatch, name):
    vol, _ = small
    out = write_result(tmp_path / name, vol, _mask(vol))
    old = out.read_bytes()

    def empty_write(image, path, *a, **k):  # what SimpleITK does for NIfTI on a full disk
        open(path, "wb").close()

    monkeypatch.setattr(sitk, "WriteImage", empty_write)
    with pytest.raises(FoBInputError, match="Not enough space"):
        write_result(out, vol, np.zeros_like(_mask(vol)))
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ct.nii.gz", name]), "no temporary file left"


def test_full_disk_seg_nrrd_is_a_clear_error(small, tmp_path, monkeypatch, capsys):
    vol, _ = small
    out = write_result(tmp_path / "r.seg.nrrd", vol, _mask(vol))
    old = out.read_bytes()

    def no_space(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slicerio, "write_segmentation", no_space)
    with pytest.raises(FoBInputError, match="Not enough space.*nothing was written"):
        write_result(out, vol, _mask(vol))
    assert out.read_bytes() == old


# 3, 14 ------------------------------------------------------------ cache entries
def _entries(folder):
    return sorted(folder.rglob("*.emb"))


def test_damaged_cache_entries_are_dropped_and_reencoded(ct, litemedsam, tmp_path, caplog):
    vol, labels = ct
    support, k, _ = one_slice_support(vol, labels == 5)
    rng = (k - 1, k + 1)
    first = Segmenter(litemedsam, cache_dir=tmp_path).segment(vol, vol, support, slice_range=rng)
    entries = _entries(tmp_path)
    assert len(entries) == first.slices_encoded >= 3
    entries[0].write_bytes(b"")  # what a power cut leaves
    damaged = bytearray(entries[1].read_bytes())
    damaged[-5000:-4000] = bytes(1000)  # a valid header with damaged values
    entries[1].write_bytes(bytes(damaged))
    wrong = EmbeddingCache(tmp_path)
    wrong._write(entries[2], np.zeros((3, 4), np.float16))  # a valid entry of the wrong shape
    with caplog.at_level(logging.WARNING):
        again = Segmenter(litemedsam, cache_dir=tmp_path).segment(vol, vol, support, slice_range=rng)
    assert again.slices_encoded == 3, "each damaged entry is encoded again"
    assert np.array_equal(again.mask, first.mask)
    assert sum("damaged embedding cache entry" in r.message for r in caplog.records) == 1, "said once"


def test_fresh_and_cached_embeddings_are_identical(ct, litemedsam):
    """A run gives the same mask whether its embeddings came from the cache or not."""
    from FoBSegmentLib.geometry import SliceView
    from FoBSegmentLib.pipeline.embedding import Embedder
    from FoBSegmentLib.preprocessing import fit_normalisation

    vol, _ = ct
    stack = SliceView.for_volume(vol).to_stack(vol.array)
    e = Embedder(litemedsam, EmbeddingCache())
    fresh = e.embed(stack, fit_normalisation(vol.array), [50])[50]
    cached = e.embed(stack, fit_normalisation(vol.array), [50])[50]
    assert e.encoded_count == 1 and np.array_equal(fresh, cached)


def test_decoded_masks_are_checked_and_their_folder_bounded(tmp_path, caplog):
    """A damaged decoded mask is dropped (said once) and decoded again; the folder stays under
    its limit by removing the least recently used masks."""
    cache = DecodeCache(tmp_path, memory_mb=0, disk_mb=1)  # about four masks of 0.25 MB
    logits = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    emb = np.ones((256, 64, 64), np.float32)
    from FoBSegmentLib.embedding_cache import array_digest

    keys = [DecodeCache.key("decoder", array_digest(emb), None, None, np.float32([0.1, 0.1, 0.2 + i / 100, 0.5]),
                            False) for i in range(8)]
    assert len(set(keys)) == 8
    assert DecodeCache.key("decoder", array_digest(emb + 1e-3), None, None, np.float32([0.1, 0.1, 0.2, 0.5]),
                           False) != keys[0], "another embedding, another key"
    for i, key in enumerate(keys):
        cache.put(key, logits + i, 0.5 + i / 100)
        if i == 1:
            os.utime(cache._path(keys[0]), (time.time() + 60, time.time() + 60))  # read most recently
            writing = cache._path(keys[0]).parent / ".fobsegment-another-process.tmp"
            writing.write_bytes(bytes(300_000))  # another process's entry being written, oldest of all
            os.utime(writing, (0, 0))
    assert sum(f.stat().st_size for f in tmp_path.rglob("*.dec")) <= 2**20
    assert writing.exists(), "a file being written by another process is not trimmed"
    got = cache.get(keys[-1])
    assert np.array_equal(got[0], logits + 7) and got[1] == np.float32(0.57)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None, "least recently used removed first"
    path = cache._path(keys[-1])
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0xFF
    path.write_bytes(bytes(data))
    cache._path(keys[-2]).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert DecodeCache(tmp_path, memory_mb=0).get(keys[-1]) is None
        assert DecodeCache(tmp_path, memory_mb=0).get(keys[-2]) is None
    assert not path.exists() and not cache._path(keys[-2]).exists()
    assert sum("damaged decoded mask cache entry" in r.message for r in caplog.records) == 2


def test_a_folder_shared_by_two_processes_stays_under_its_limit(tmp_path):
    """Two processes writing decoded masks to one folder: each counts the folder again before
    its own writes since the last count pass an eighth of the limit, so neither trims by a
    stale count and the folder stays under the limit."""
    logits = np.zeros((256, 256), np.float32)
    one, two = DecodeCache(tmp_path, memory_mb=0, disk_mb=1), DecodeCache(tmp_path, memory_mb=0, disk_mb=1)
    for i in range(12):
        (one if i % 3 else two).put(f"{i:02d}" * 20, logits + i, 0.5)
        assert sum(f.stat().st_size for f in tmp_path.rglob("*.dec")) <= 2**20, i


def test_embedding_folder_is_bounded_least_recently_read_out_first(tmp_path):
    """The embeddings folder stays under its limit; an embedding read from disk by another
    process counts as used, so the volume a user is working on is kept."""
    emb = np.random.default_rng(1).normal(size=(256, 64, 64)).astype(np.float32)  # 2 MB at fp16
    keys = [EmbeddingCache.key(emb + i, "backbone") for i in range(6)]
    cache = EmbeddingCache(tmp_path, memory_mb=0, disk_mb=9)  # four embeddings, trimmed to 6.75 MB
    for i, key in enumerate(keys[:3]):
        cache.put(key, emb + i)
        os.utime(cache._path(key), (1000 + i, 1000 + i))  # written in this order, long ago
    reader = EmbeddingCache(tmp_path, memory_mb=0)
    assert reader.get(keys[0], shape=emb.shape) is not None  # the oldest is read again: used now
    for i, key in enumerate(keys[3:], 3):
        cache.put(key, emb + i)
    files = list(tmp_path.rglob("*.emb"))
    assert sum(f.stat().st_size for f in files) <= 9 * 2**20
    kept = [k for k in keys if reader.get(k, shape=emb.shape) is not None]
    assert keys[0] in kept and keys[1] not in kept and keys[2] not in kept, kept
    assert kept == [keys[0], *keys[3:]], "the entries written since stay"
    unbounded = EmbeddingCache(tmp_path / "unbounded", memory_mb=0)
    for i, key in enumerate(keys):
        unbounded.put(key, emb + i)
    assert len(list((tmp_path / "unbounded").rglob("*.emb"))) == 6, "no limit given: nothing removed"


# 4 ------------------------------------------------------------------ unusable cache folder
def test_unusable_cache_folder_falls_back_to_memory(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = EmbeddingCache(blocker / "cache")
    with caplog.at_level(logging.WARNING):
        out = cache.put("ab" * 20, np.ones((2, 2), np.float32))
        cache.put("cd" * 20, np.ones((2, 2), np.float32))
    assert np.array_equal(out, np.ones((2, 2))) and cache.get("cd" * 20) is not None
    assert sum("kept in memory only" in r.message for r in caplog.records) == 1


# 5 ------------------------------------------------------------------ label values > 255
def test_seg_nrrd_keeps_label_values_above_255(small, tmp_path):
    vol, _ = small
    out = write_segments(tmp_path / "cmr.seg.nrrd", vol, [(_mask(vol), "lv_bp", (1, 0, 0), 500)])
    back = slicerio.read_segmentation(str(out))
    assert back["segments"][0]["labelValue"] == 500
    assert read_support_mask(out, vol, label=500).mask.sum() == _mask(vol).sum()


# 6 ------------------------------------------------------------------ unwritable folder
def test_unwritable_output_folder_fails_before_any_work(small, tmp_path, monkeypatch, capsys):
    vol, path = small
    sup = write_result(tmp_path / "sup.nii.gz", vol, _mask(vol))
    import FoBSegmentLib.files as files

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    from FoBSegmentLib.pipeline import segmenter

    def no_model(*a, **k):
        raise AssertionError("a model was built before the output folder was checked")

    monkeypatch.setattr(segmenter.Segmenter, "__init__", no_model)
    code = main(["segment", "--volume", str(path), "--support-mask", str(sup), "--output", str(tmp_path / "o.nii.gz")])
    assert code == 2 and "not writable" in capsys.readouterr().err


# 7 ------------------------------------------------------------------ damaged checkpoints
@pytest.mark.parametrize("kind", ["random", "empty", "truncated", "tensor", "module"])
def test_damaged_or_wrong_checkpoint_gets_one_paragraph(tmp_path, kind):
    from FoBSegmentLib.backbones import create_backbone
    from FoBSegmentLib.backbones.litemedsam import embedded_checkpoint

    p = tmp_path / f"{kind}.pth"
    if kind == "random":
        p.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        p.write_bytes(embedded_checkpoint()[0].read_bytes()[:100_000])
    elif kind == "tensor":
        torch.save(torch.zeros(3), p)
    else:
        torch.save(torch.nn.Linear(2, 2), p)
    with pytest.raises(CheckpointError) as err:
        create_backbone("litemedsam", "cpu", checkpoint=p)
    msg = str(err.value)
    assert str(p) in msg and len(msg) < 700 and "\n" not in msg


# 8 ------------------------------------------------------------------ umask
def test_outputs_and_cache_honour_the_umask(small, tmp_path):
    vol, _ = small
    old = os.umask(0o027)  # not the common 022: a hard-coded mode would not pass
    try:
        out = write_result(tmp_path / "r.seg.nrrd", vol, _mask(vol))
        EmbeddingCache(tmp_path / "cache").put("ef" * 20, np.ones(2, np.float32))
        DecodeCache(tmp_path / "cache").put("ef" * 20, np.ones((4, 4), np.float32), 0.9)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o640
    written = list((tmp_path / "cache").rglob("*.emb")) + list((tmp_path / "cache").rglob("*.dec"))
    assert len(written) == 2 and all(p.stat().st_mode & 0o777 == 0o640 for p in written)


# 9 ------------------------------------------------------------------ sheared geometry
def test_sheared_direction_is_refused_for_nifti(small, tmp_path):
    vol, _ = small
    d = np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1.0]])
    sheared = Volume(vol.array, vol.spacing, vol.origin, d / np.linalg.norm(d, axis=0))  # unit, not orthogonal
    with pytest.raises(FoBInputError, match="NIfTI cannot store it"):
        write_result(tmp_path / "r.nii.gz", sheared, _mask(vol))
    assert not list(tmp_path.glob("r.*"))
    out = write_result(tmp_path / "r.nrrd", sheared, _mask(vol))
    back = read_volume(out)
    assert np.allclose(back.ijk_to_lps(), sheared.ijk_to_lps(), atol=1e-4), "NRRD keeps the query's geometry"


# 10 ----------------------------------------------------------------- constant volume
def test_constant_volume_is_refused(small, segmenter):
    vol, _ = small
    blank = vol.with_array(np.zeros_like(vol.array))
    with pytest.raises(FoBInputError, match="nothing to segment"):
        segmenter.segment(blank, None, _mask(vol))


# 11 ----------------------------------------------------------------- two DICOM series
def test_dicom_folder_with_two_series_asks_which(small, tmp_path):
    vol, _ = small
    folder = tmp_path / "dicom"
    folder.mkdir()
    img = sitk.Cast(sitk.GetImageFromArray(vol.array[:3].astype(np.int16)), sitk.sitkInt16)
    for s, (uid, desc) in enumerate((("1.2.826.0.1.3680043.8.498.1", "T1 axial"),
                                     ("1.2.826.0.1.3680043.8.498.2", "T2 axial"))):
        for z in range(3):
            sl = img[:, :, z]
            for tag, value in (("0020|000e", uid), ("0008|103e", desc), ("0020|0013", str(z + 1)),
                               ("0020|0032", f"0\\0\\{z * 2.0}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                               ("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.8.498.9")):
                sl.SetMetaData(tag, value)
            w = sitk.ImageFileWriter()
            w.KeepOriginalImageUIDOn()
            w.SetFileName(str(folder / f"s{s}_{z}.dcm"))
            w.Execute(sl)
    with pytest.raises(FoBInputError) as err:
        read_volume(folder)
    assert "T1 axial" in str(err.value) and "T2 axial" in str(err.value) and "--series" in str(err.value)
    assert read_volume(folder, series="2").array.shape[0] == 3
    assert read_volume(folder, series="1.2.826.0.1.3680043.8.498.1").array.shape[0] == 3


# 12 ----------------------------------------------------------------- .mhd
def test_mhd_output_is_refused(small, tmp_path):
    vol, _ = small
    with pytest.raises(FoBInputError, match="Unsupported output format"):
        write_result(tmp_path / "r.mhd", vol, _mask(vol))
    assert not list(tmp_path.glob("*raw")) and not list(tmp_path.glob("r.*"))


# 13 ----------------------------------------------------------------- minor rules
def test_two_segments_with_one_label_value_are_refused(small, tmp_path):
    vol, _ = small
    m2 = np.zeros_like(_mask(vol))
    m2[3, 10:20, 10:20] = 1
    out = write_segments(tmp_path / "two.seg.nrrd", vol, [(_mask(vol), "a", (1, 0, 0), 1), (m2, "b", (0, 1, 0), 1)])
    with pytest.raises(FoBInputError, match="Several segments.*--segment"):
        read_support_mask(out, vol, label=1)
    assert read_support_mask(out, vol, segment="b").mask.sum() == m2.sum()


def test_soft_mask_follows_the_librarys_rule(small, tmp_path):
    vol, _ = small
    soft = _mask(vol).astype(np.float32) * 0.5
    p = tmp_path / "soft.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(soft), str(p))
    img = sitk.ReadImage(str(p))
    img.CopyInformation(sitk.ReadImage(str(small[1])))
    sitk.WriteImage(img, str(p))
    sm = read_support_mask(p, vol)
    assert sm.mask.sum() == _mask(vol).sum(), "0.5 is foreground, as in the library (mask > 0)"
    with pytest.raises(FoBInputError, match="non-integer"):
        read_support_mask(p, vol, label=1)


def test_stale_onnx_part_is_cleaned(tmp_path):
    from FoBSegmentLib.backbones.onnx_runtime import _clean_stale_parts

    stale, fresh = tmp_path / "enc.onnx.abc.part", tmp_path / "enc.onnx.def.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    _clean_stale_parts(tmp_path)
    assert not stale.exists() and fresh.exists(), "a part another process may still write is kept"


# 13 ----------------------------------------------------------------- what a writer is given
def test_writer_refuses_what_it_cannot_write_faithfully(small, tmp_path):
    """A mask off the query's grid, a label value a label map cannot hold (0 is background), a
    segment name a .seg.nrrd header cannot hold, nothing to write, a write-protected output:
    refused, and nothing written or replaced."""
    from FoBSegmentLib.io import write_segments

    vol, _ = small
    m = _mask(vol)
    bad = [(dict(mask=m[:, :10]), "on the query's grid"), (dict(label_value=0), "from 1 to 65535"),
           (dict(label_value=2.5), "from 1 to 65535"), (dict(label_value=70000), "from 1 to 65535")]
    for ext in (".nii.gz", ".seg.nrrd"):
        for kw, message in bad:
            kw = {"mask": m, **kw}
            with pytest.raises(FoBInputError, match=message):
                write_result(tmp_path / f"r{ext}", vol, kw.pop("mask"), **kw)
    with pytest.raises(FoBInputError, match="only ASCII"):
        write_result(tmp_path / "r.seg.nrrd", vol, m, name="Milz – größer")
    with pytest.raises(FoBInputError, match="line break"):
        write_result(tmp_path / "r.seg.nrrd", vol, m, name="a\nb:=c")
    with pytest.raises(FoBInputError, match="Nothing to write"):
        write_segments(tmp_path / "r.nrrd", vol, [])
    from FoBSegmentLib.io import result_label

    # a support's label value a label map cannot hold: the result is written as 1, not refused after the run
    assert (result_label(300), result_label(70000), result_label(None)) == (300, 1, 1)
    assert not list(tmp_path.glob("r*"))
    write_result(tmp_path / "u.nii.gz", vol, m, name="Milz – größer")  # a label map keeps no name
    kept = write_result(tmp_path / "kept.nii.gz", vol, m)
    os.chmod(kept, 0o444)
    before = kept.read_bytes()
    with pytest.raises(FoBInputError, match="write-protected"):
        write_result(kept, vol, np.zeros_like(m))
    assert kept.read_bytes() == before and kept.stat().st_mode & 0o777 == 0o444


# 14 ----------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_a_segmentation_exits_130_and_writes_nothing(small, tmp_path, monkeypatch, capsys):
    from FoBSegmentLib.pipeline.segmenter import Segmenter as Seg

    vol, path = small
    sup = write_result(tmp_path / "sup.nii.gz", vol, _mask(vol))
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"an earlier result")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Seg, "segment", interrupted)
    code = main(["segment", "--volume", str(path), "--support-mask", str(sup), "--output", str(out)])
    assert code == 130 and "interrupted; nothing was written" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier result" and not list(tmp_path.glob(".fobsegment-*"))


def test_ctrl_c_during_a_batch_keeps_the_finished_cases(small, tmp_path, monkeypatch, capsys):
    """The first Ctrl-C lets the current case finish and stops before the next (exit 130); the
    finished cases stay recorded, so the same command resumes."""
    import json
    import signal

    import FoBSegmentLib.batch as batch

    vol, path = small
    write_result(tmp_path / "sup.nii.gz", vol, _mask(vol))
    (tmp_path / "cases.csv").write_text("id,query,support_mask\n" + "".join(
        f"c{n},{path.name},sup.nii.gz\n" for n in range(3)))
    (tmp_path / "out").mkdir()
    ran = []

    def one_case(case, out_dir, options, progress=None, is_cancelled=None, segmenter=None):
        ran.append(case.id)
        if case.id == "c1":
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C during case c1
        (out_dir / case.output).write_bytes(b"result")
        return batch.CaseResult(case.id, "ok", output=str(out_dir / case.output),
                                sha256=batch.sha256_of(out_dir / case.output))

    monkeypatch.setattr(batch, "run_case", one_case)
    previous = signal.getsignal(signal.SIGINT)
    try:
        code = main(["batch", "--manifest", str(tmp_path / "cases.csv"), "--output-dir", str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert code == 130 and "finished cases are kept" in err
    assert ran == ["c0", "c1"], "the case running at Ctrl-C finishes; no further case starts"
    done = [json.loads(line)["id"] for line in (tmp_path / "out" / "summary.jsonl").read_text().splitlines()]
    assert done == ["c0", "c1"]

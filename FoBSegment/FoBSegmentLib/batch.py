"""Batch segmentation of many volumes: one model per process, resumable, shardable.

A manifest (CSV with a header, or JSON lines) lists one case per row:

=================  ==========================================================================
``query``          the volume to segment (required)
``support_mask``   labelmap or ``.seg.nrrd`` annotated on the support volume (required)
``support_volume`` the volume the support was painted on (default: the query)
``label``          label value of the structure in the support mask
``segment``        segment name in a ``.seg.nrrd`` support mask
``reference``      reference labelmap of the query, for Dice (optional)
``reference_label`` its label value (default: ``label``, else any non-zero voxel)
``output``         output file name inside the output folder (default ``<id>.seg.nrrd``)
``id``             case id (default: the row number)
``support_slices`` which annotated slices of the support mask to use, e.g. ``12 18 24``
                   (default: all)
``oracle``         ``true``: segment only the slices where the reference has the structure
                   (the EP1 evaluation protocol; needs ``reference``)
``atlas_fusion``   with several supports: ``consensus`` (default) or ``vote``
``within``         the id of an earlier case on the same query: this case's result is kept
                   within that case's first to last slice (along the acquisition axis), e.g.
                   the right ventricle within the left ventricle's blood pool on a cardiac
                   short-axis stack, whose labels never reach past it
=================  ==========================================================================

Several support patients (an atlas, :meth:`Segmenter.segment_atlas`): list them in
``support_volume`` and ``support_mask`` separated by ``|`` (a list in JSON lines), the same
number of each, in the same order.

Relative paths are relative to the manifest's folder.  Every case runs by the rules of
``fobsegment segment`` (nothing is written half-way; an output never replaces an input).  A
case whose output is present and verified (same SHA-256 as recorded when it was written) and
whose recipe is unchanged (the row, its input files' size and modification time, the model and
its settings) is skipped (unless the case it is kept ``within`` runs again), so an interrupted
batch resumes where it stopped and a changed row runs again; a case that fails is recorded
with its message and the batch goes on.
``shard=(i, n)`` keeps rows ``i, i + n, i + 2n, ...`` (0-based), so a Slurm array or one
process per GPU splits a manifest without coordination.
``engine="dask"`` runs the cases on a Dask ``LocalCluster`` (or a given scheduler address)
with one Segmenter per worker process.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CancelledError, FoBError, FoBInputError
from .files import atomic_write, check_writable_folder, file_identity

FIELDS = ("id", "query", "support_volume", "support_mask", "label", "segment", "reference", "reference_label",
          "output", "support_slices", "oracle", "atlas_fusion", "within")
SUMMARY_FIELDS = ("id", "status", "message", "output", "slices_kept", "slices_encoded", "seconds", "dice", "sha256",
                  "recipe")


@dataclass
class Case:
    id: str
    query: Path
    support_mask: Path
    support_volume: Path | None = None
    label: int | None = None
    segment: str | None = None
    reference: Path | None = None
    reference_label: int | None = None
    output: str = ""
    support_slices: tuple[int, ...] | None = None
    oracle: bool = False
    more_supports: tuple = ()  # ((support volume, support mask), ...) after the first: an atlas
    atlas_fusion: str | None = None  # None: the Segmenter's settings.atlas.fusion
    within: str | None = None  # id of the case whose result bounds this one's slices
    within_output: str = ""  # that case's output file name


@dataclass
class CaseResult:
    id: str
    status: str  # ok | failed | skipped | cancelled
    message: str = ""
    output: str = ""
    slices_kept: int | None = None
    slices_encoded: int | None = None
    seconds: float | None = None
    dice: float | None = None
    sha256: str = ""
    recipe: str = ""  # case_recipe(): what the output was made from
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ manifest
def read_manifest(path: str | Path) -> list[Case]:
    """CSV (header row) or JSON lines -> cases; a bad row is a clear error naming the row."""
    p = Path(path)
    if p.is_dir():
        raise FoBInputError(f"The manifest {p} is a folder; give the manifest file (CSV or JSON lines).")
    if not p.is_file():
        raise FoBInputError(f"The manifest {p} does not exist. Check the path.")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise FoBInputError(f"The manifest {p.name} is not a text file (CSV or JSON lines, UTF-8): check that "
                            "--manifest names the manifest, not an image.") from None
    except OSError as exc:
        raise FoBInputError(f"Cannot read the manifest {p}: {exc.strerror or exc}. Check its permissions.") from None
    rows: list[dict] = []
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise FoBInputError(f"Line {n} of the manifest {p.name} is not JSON ({exc.msg}).") from None
                if not isinstance(rows[-1], dict):
                    raise FoBInputError(f"Line {n} of the manifest {p.name} is not a JSON object such as "
                                        '{"query": "q.nii.gz", "support_mask": "m.nii.gz"}.')
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise FoBInputError(f"The manifest {p.name} lists no case.")
    cases, ids = [], set()
    for n, row in enumerate(rows, 1):
        if None in row:  # csv.DictReader keys a row's surplus cells None
            raise FoBInputError(f"Row {n} of {p.name} has more cells than the header has columns "
                                f"({len(row) - 1 + len(row[None])} vs {len(row) - 1}); quote cells holding commas.")
        unknown = set(row) - set(FIELDS)
        if unknown:
            raise FoBInputError(f"Row {n} of {p.name} has unknown column(s) {sorted(unknown)}; known: {', '.join(FIELDS)}.")
        several = {k: _listed(row.get(k)) for k in ("support_volume", "support_mask")}
        row = {**row, **{k: v[0] for k, v in several.items() if v}}
        get = lambda k: (str(row.get(k)).strip() if row.get(k) not in (None, "") else None)  # noqa: E731
        if not get("query") or not get("support_mask"):
            raise FoBInputError(f"Row {n} of {p.name} needs at least 'query' and 'support_mask'.")
        cid = get("id") or str(n)
        if cid in ids:
            raise FoBInputError(f"Case id {cid!r} appears twice in {p.name}; ids must be unique.")
        ids.add(cid)

        def path_of(k):
            v = get(k)
            return None if v is None else (Path(v) if Path(v).is_absolute() else p.parent / v)

        def int_of(k):
            v = get(k)
            try:
                if v is None:
                    return None
                if float(v) != int(float(v)):
                    raise ValueError
                return int(float(v))
            except (ValueError, OverflowError):
                raise FoBInputError(f"Row {n} of {p.name}: {k} must be an integer (got {v!r}).") from None

        def slices_of(k):
            v = row.get(k)
            if v in (None, ""):
                return None
            try:
                items = v if isinstance(v, list) else str(v).replace(";", " ").replace(",", " ").split()
                if any(isinstance(x, bool) or float(x) != int(float(x)) for x in items):
                    raise ValueError
                return tuple(int(float(x)) for x in items)
            except (ValueError, TypeError):
                raise FoBInputError(f"Row {n} of {p.name}: {k} must be slice numbers such as '12 18 24' "
                                    f"(got {v!r}).") from None

        def flag_of(k):
            v = row.get(k)
            if v in (None, "") or v is False:
                return False
            if v is True or str(v).strip().lower() in ("1", "true", "yes"):
                return True
            if str(v).strip().lower() in ("0", "false", "no"):
                return False
            raise FoBInputError(f"Row {n} of {p.name}: {k} must be true or false (got {v!r}).")

        out = get("output") or f"{cid}.seg.nrrd"
        if Path(out).name != out:
            raise FoBInputError(f"Row {n} of {p.name}: output must be a file name, not a path ({out!r}).")
        twin = next((c for c in cases if c.output.lower() == out.lower()), None)
        if twin is not None:
            raise FoBInputError(f"Row {n} of {p.name}: output {out!r} is also case {twin.id!r}'s; each case needs "
                                "its own output file.")
        case = Case(cid, path_of("query"), path_of("support_mask"), path_of("support_volume"), int_of("label"),
                    get("segment"), path_of("reference"), int_of("reference_label"), out, slices_of("support_slices"),
                    flag_of("oracle"))
        vols, masks = several["support_volume"], several["support_mask"]
        if len(masks) > 1 or len(vols) > 1:
            if len(vols) != len(masks):
                raise FoBInputError(f"Row {n} of {p.name}: {len(masks)} support masks but {len(vols)} support volumes; "
                                    "an atlas needs one support_volume per support_mask (separated by '|').")
            if case.support_slices:
                raise FoBInputError(f"Row {n} of {p.name}: support_slices names slices of one support; leave it "
                                    "empty with several supports.")

            def rel(v):
                return Path(v) if Path(v).is_absolute() else p.parent / v

            case.more_supports = tuple((rel(v), rel(m)) for v, m in zip(vols[1:], masks[1:]))
        fusion = get("atlas_fusion")
        if fusion is not None:
            from .pipeline.atlas import RULES

            if fusion not in RULES:
                raise FoBInputError(f"Row {n} of {p.name}: atlas_fusion must be one of {', '.join(RULES)} "
                                    f"(got {fusion!r}).")
            case.atlas_fusion = fusion
        if case.oracle and case.reference is None:
            raise FoBInputError(f"Row {n} of {p.name}: oracle needs a reference (it segments the reference's slices).")
        within = get("within")
        if within is not None:
            bound = next((c for c in cases if c.id == within), None)
            if bound is None:
                raise FoBInputError(f"Row {n} of {p.name}: within={within!r} must be the id of an earlier row "
                                    "(the case whose result bounds this one runs first).")
            if bound.query.resolve() != case.query.resolve():
                raise FoBInputError(f"Row {n} of {p.name}: within={within!r} names a case on another query "
                                    f"({bound.query.name}); a bound must be a structure of the same image.")
            if bound.within:
                raise FoBInputError(f"Row {n} of {p.name}: within={within!r} names a case that is itself kept within "
                                    f"case {bound.within!r}; name {bound.within!r} instead (one level of bound).")
            case.within, case.within_output = within, bound.output
        cases.append(case)
    return cases


def _listed(v) -> list:
    """A manifest cell naming one file or several ('a|b', or a JSON list) -> [str, ...]."""
    if v in (None, ""):
        return []
    items = v if isinstance(v, list) else str(v).split("|")
    return [str(x).strip() for x in items if str(x).strip()]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise FoBInputError(f"--shard must look like I/N, e.g. 0/4 (got {text!r}).") from None
    if not (n >= 1 and 0 <= i < n):
        raise FoBInputError(f"--shard {text}: need 0 <= I < N.")
    return i, n


def shard_cases(cases: list[Case], shard: tuple[int, int]) -> list[Case]:
    i, n = shard
    return cases[i::n]


# ------------------------------------------------------------------------------ one case
_SEGMENTERS: dict = {}


def segmenter_for(options: dict):
    """One Segmenter per process and option set: the model is built once and its cache kept."""
    key = json.dumps(options, sort_keys=True, default=str)
    if key not in _SEGMENTERS:
        from .pipeline.segmenter import Segmenter

        _SEGMENTERS[key] = Segmenter(**options)
    return _SEGMENTERS[key]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def case_recipe(case: Case, options: dict, segmenter=None) -> str:
    """A digest of what a case's output is made from: the row, each input file's resolved path,
    size and modification time, the model and its settings.  A resumed batch reuses an output
    only under the same recipe: a row edited to another label, a re-exported input or another
    backbone must not be reported as done."""
    from . import __version__

    def stamp(path):
        if path is None:
            return None
        try:
            st = Path(path).stat()
            return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
        except OSError:
            return [str(path), None, None]

    row = asdict(case)
    for k in ("query", "support_mask", "support_volume", "reference"):
        row[k] = stamp(row[k])
    row["more_supports"] = [[stamp(v), stamp(m)] for v, m in case.more_supports]
    # The same model list whether the Segmenter is given or built from the options (an
    # evaluation resumed under another engine must not run again).
    from .settings import DEFAULT_SETTINGS

    backbone = segmenter.backbone if segmenter is not None else options.get("backbone", "litemedsam")
    prompter = getattr(segmenter, "start_prompter", None)
    model = [getattr(backbone, "name", backbone), stamp(options.get("checkpoint")),
             repr(segmenter.settings if segmenter is not None else options.get("settings", DEFAULT_SETTINGS)),
             segmenter.prompt_source if segmenter is not None else options.get("prompt_source", "contrast"),
             stamp(getattr(prompter, "weights", None) or options.get("weights"))]
    text = json.dumps([__version__, row, model], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_case(case: Case, out_dir: Path, options: dict, progress=None, is_cancelled=None,
             segmenter=None) -> CaseResult:
    """Segment one case; input errors become a ``failed`` result with their message.
    ``segmenter``: a built Segmenter to use instead of one built from ``options``."""
    from . import io

    t0 = time.perf_counter()
    out = out_dir / case.output
    try:
        more = [p for pair in case.more_supports for p in pair]
        inp = io.read_segmentation_inputs(out, case.query, case.support_mask, case.support_volume, case.label,
                                          case.segment, also_inputs=[*([case.reference] if case.reference else []),
                                                                     *more], what=f" of case {case.id}")
        query, support, sm = inp.query, inp.support, inp.support_mask
        atlas = [(support, sm.mask), *io.read_more_supports(case.more_supports, case.label, case.segment,
                                                            f" of case {case.id}")] if case.more_supports else []
        reference = _read_reference(case, query) if case.reference is not None else None
        query_slices = None
        if case.oracle:
            from .geometry import SliceView, occupied_slices

            query_slices = occupied_slices(SliceView.for_volume(query).to_stack(reference))
            if not query_slices:
                raise FoBInputError(f"The reference of case {case.id} does not contain the structure, so there is "
                                    f"no slice to segment with oracle: check reference_label.")
        seg = segmenter if segmenter is not None else segmenter_for(options)
        if atlas:
            res = seg.segment_atlas(query, atlas, rule=case.atlas_fusion, query_slices=query_slices,
                                    progress=progress, is_cancelled=is_cancelled)
        else:
            res = seg.segment(query, support, sm.mask, support_slices=list(case.support_slices or []) or None,
                              query_slices=query_slices, progress=progress, is_cancelled=is_cancelled)
        if case.within:
            res = _kept_within(case, out_dir, query, res)
        d = None
        if reference is not None:
            from .evaluation import dice

            d = round(dice(res.mask > 0, reference), 4)
        name = io.result_name(sm.name)
        io.write_result(out, query, res.mask, name=name, color=sm.color,
                        label_value=io.result_label(sm.label_value))
        return CaseResult(case.id, "ok", "", str(out), res.slices_segmented, res.slices_encoded,
                          round(time.perf_counter() - t0, 2), d, sha256_of(out))
    except CancelledError:
        return CaseResult(case.id, "cancelled", "cancelled; nothing was written for this case")
    except FoBError as exc:
        return CaseResult(case.id, "failed", str(exc), seconds=round(time.perf_counter() - t0, 2))
    except MemoryError:
        return CaseResult(case.id, "failed", "out of memory", seconds=round(time.perf_counter() - t0, 2))
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop the batch; the message says it is a bug
        return CaseResult(case.id, "failed", f"internal error ({type(exc).__name__}: {exc}); please report it",
                          seconds=round(time.perf_counter() - t0, 2))


def _kept_within(case: Case, out_dir: Path, query, res):
    """``res`` with its mask cleared outside the slices of the result of case ``case.within``."""
    from . import io

    bound_path = out_dir / case.within_output
    if not bound_path.is_file():
        raise FoBInputError(f"Case {case.id} is kept within case {case.within}, whose result {bound_path.name} is not "
                            f"in {out_dir}: run case {case.within} first (in the same shard, before this one).")
    res.keep_within(io.read_result_mask(bound_path, query), query)
    return res


def _read_reference(case: Case, query):
    """The reference's structure as a boolean mask on the query's grid (read before any work)."""
    import numpy as np

    from . import io

    ref = io.read_volume(case.reference, f"reference of case {case.id}")
    if ref.array.shape != query.array.shape:
        raise FoBInputError(f"The reference of case {case.id} is not on the query's grid "
                            f"({ref.array.shape} vs {query.array.shape}).")
    value = case.reference_label if case.reference_label is not None else case.label
    return (np.rint(ref.array) == value) if value is not None else ref.array > 0


def _dask_case(case: Case, out_dir: str, options: dict, threads: int) -> dict:
    """What a Dask worker runs: one case with the worker's own Segmenter."""
    from .backbones.cpu_runtime import set_threads

    set_threads(threads)
    return asdict(run_case(case, Path(out_dir), options))


# ------------------------------------------------------------------------------ the batch
class Summary:
    """``summary.jsonl`` (appended after every case, so an interrupted batch keeps what it did)
    plus ``summary.csv`` and ``summary.json`` rewritten at the end."""

    def __init__(self, out_dir: Path, shard: tuple[int, int]):
        tag = "" if shard == (0, 1) else f"-shard{shard[0]}of{shard[1]}"
        self.jsonl = out_dir / f"summary{tag}.jsonl"
        self.csv = out_dir / f"summary{tag}.csv"
        self.json = out_dir / f"summary{tag}.json"
        self.done: dict[str, dict] = {}
        if self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                self.done[r["id"]] = r

    def finished(self, case: Case, out_dir: Path, recipe: str) -> dict | None:
        """The earlier result of a case whose output is still there and unchanged, made by the
        same recipe (:func:`case_recipe`)."""
        r = self.done.get(case.id)
        out = out_dir / case.output
        if (r and r.get("status") in ("ok", "skipped") and r.get("recipe") == recipe and out.is_file()
                and r.get("sha256") == sha256_of(out)):
            return r
        return None

    def add(self, r: CaseResult) -> None:
        row = {k: getattr(r, k) for k in SUMMARY_FIELDS}
        self.done[r.id] = row
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write(self, order: list[str]) -> dict:
        rows = [self.done[i] for i in order if i in self.done]

        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, SUMMARY_FIELDS)
                w.writeheader()
                w.writerows(rows)

        totals = totals_of(rows, len(order))
        atomic_write(self.csv, write_csv, suffix=".csv")
        atomic_write(self.json, lambda tmp: tmp.write_text(json.dumps({"totals": totals, "cases": rows}, indent=1)),
                     suffix=".json")
        return totals


def totals_of(rows: list[dict], n_cases: int) -> dict:
    ok = [r for r in rows if r["status"] in ("ok", "skipped")]
    dices = [r["dice"] for r in ok if r.get("dice") is not None]
    return {
        "cases": n_cases, "ok": sum(r["status"] == "ok" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "not_run": n_cases - len(rows),
        "seconds": round(sum(r.get("seconds") or 0 for r in rows if r["status"] == "ok"), 1),
        "mean_dice": round(sum(dices) / len(dices), 4) if dices else None,
    }


def run_batch(manifest, out_dir, options: dict | None = None, shard=(0, 1), engine: str = "local",
              workers: int = 1, scheduler: str | None = None, progress=None, is_cancelled=None,
              on_case=None, segmenter=None) -> dict:
    """Run every case of the manifest's shard; returns the totals (see :func:`totals_of`).

    ``manifest``: a manifest file or a list of :class:`Case`.  ``progress(done, total)``
    reports slices of the current case (local engine); ``on_case(result)`` is called after
    every case.  ``segmenter``: a built Segmenter for the local engine (its settings and cache
    are used).  A cancel stops after the current slice; the cases finished so far stay written
    and recorded."""
    cases = shard_cases(manifest if isinstance(manifest, list) else read_manifest(manifest), shard)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FoBInputError(f"The output folder {out_dir} is a file; give a folder with --output-dir.")
    if not out_dir.is_dir():
        raise FoBInputError(f"The output folder {out_dir} does not exist. Create it first.")
    check_writable_folder(out_dir)
    options = dict(options or {})
    _refuse_outputs_over_inputs(cases, out_dir)
    summary = Summary(out_dir, shard)
    recipes = {c.id: case_recipe(c, options, segmenter) for c in cases}
    redo: set = set()
    for case in cases:
        earlier = summary.finished(case, out_dir, recipes[case.id])
        if case.within in redo:  # its bound is computed again, so is its result
            earlier = None
        if earlier is None:
            redo.add(case.id)
        else:
            r = CaseResult(**{**{k: earlier.get(k) for k in SUMMARY_FIELDS}, "status": "skipped",
                              "message": "output present and verified"})
            summary.add(r)
            if on_case:
                on_case(r)
    todo = [c for c in cases if c.id in redo]
    try:
        if engine == "local":
            for case in todo:
                if is_cancelled is not None and is_cancelled():
                    raise CancelledError()
                r = run_case(case, out_dir, options, progress, is_cancelled, segmenter)
                if r.status == "cancelled":
                    raise CancelledError()
                r.recipe = recipes[case.id]
                summary.add(r)
                if on_case:
                    on_case(r)
        elif engine == "dask":
            if segmenter is not None:
                raise FoBInputError("The dask engine builds its own Segmenter in every worker: pass options, "
                                    "not a segmenter.")
            _run_dask(todo, out_dir, options, workers, scheduler, summary, on_case, is_cancelled, recipes)
        else:
            raise FoBInputError(f"Unknown engine {engine!r}: use local or dask.")
    finally:
        totals = summary.write([c.id for c in cases])
    return totals


def _refuse_outputs_over_inputs(cases: list, out_dir: Path) -> None:
    """No case's output may replace any case's input (an output folder that is also the
    manifest's folder): refused before any case runs."""
    from . import io

    inputs = {p for c in cases for p in (c.query, c.support_mask, c.support_volume, c.reference,
                                         *[q for pair in c.more_supports for q in pair]) if p is not None}
    # Every input's identity once, so that a cohort of thousands is checked in one pass.
    known = set().union(*(file_identity(p) for p in inputs))
    folders = set()
    for p in inputs:
        with contextlib.suppress(OSError):
            if Path(p).is_dir():  # a DICOM series folder
                folders.add(os.path.normcase(os.path.realpath(p)))
    for c in cases:
        out = out_dir / c.output
        inside = out.exists() and os.path.normcase(os.path.dirname(os.path.realpath(out))) in folders
        if inside or file_identity(out) & known:  # say which input, as a single output's check does
            io.refuse_overwriting_inputs(out, inputs, f"output (case {c.id})")


def _run_dask(todo, out_dir, options, workers, scheduler, summary, on_case, is_cancelled, recipes):
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise FoBInputError("The dask engine needs Dask distributed: pip install 'dask[distributed]'.") from None
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    try:
        # a case kept within another's result waits for every case without a bound
        for wave in ([c for c in todo if not c.within], [c for c in todo if c.within]):
            futures = [client.submit(_dask_case, c, str(out_dir), options, threads, key=f"fobsegment-{c.id}",
                                     pure=False) for c in wave]
            for fut in as_completed(futures):
                r = CaseResult(**fut.result())
                r.recipe = recipes[r.id]
                summary.add(r)
                if on_case:
                    on_case(r)
                if is_cancelled is not None and is_cancelled():
                    for f in futures:
                        f.cancel()
                    raise CancelledError()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def cmd_batch(args) -> int:
    import signal
    import sys

    stop = {"now": False}

    def interrupt(signum, frame):
        if stop["now"]:
            raise KeyboardInterrupt
        stop["now"] = True
        print("fobsegment: stopping after the current slice (Ctrl-C again to stop at once)...", file=sys.stderr)

    signal.signal(signal.SIGINT, interrupt)
    options = {"backbone": args.backbone, "device": args.device, "checkpoint": args.checkpoint,
               "cache_dir": args.cache_dir}
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(shard_cases(read_manifest(args.manifest), parse_shard(args.shard))), unit="case",
                   desc="cases")

    def on_case(r):
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{r.id}: {r.status}")
        line = f"{r.id}: {r.status}"
        if r.status == "ok":
            line += f", {r.slices_kept} slices kept, {r.slices_encoded} encoded, {r.seconds} s"
            line += f", Dice {r.dice}" if r.dice is not None else ""
        elif r.message:
            line += f" ({r.message})"
        print(line, flush=True)

    try:
        totals = run_batch(args.manifest, args.output_dir, options, parse_shard(args.shard), args.engine,
                           args.workers, args.scheduler, is_cancelled=lambda: stop["now"], on_case=on_case)
    except CancelledError:
        print("fobsegment: batch interrupted; finished cases are kept, run the same command to resume.",
              file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    return 0 if totals["failed"] == 0 else 1

"""Are two benchmark runs the same, case by case?

    .venv/bin/python benchmarks/compare_runs.py BEFORE.json[,MORE.json] AFTER.json[,MORE.json]

Reads the raw JSON of `benchmarks/all_supports.py` (dataset -> protocol -> support -> result),
merging comma-separated files on each side, and compares the 3D Dice of every (dataset,
protocol, support, structure, query case) present on both sides.  Prints how many values were
compared, how many are identical, and the differing ones.  Exit code 1 when any differs: the
check that a refactoring changed no result.
"""

from __future__ import annotations

import json
import sys


def load(paths: str) -> dict:
    out: dict = {}
    for p in paths.split(","):
        with open(p) as f:
            for ds, per in json.load(f).items():
                for prot, sups in per.items():
                    out.setdefault(ds, {}).setdefault(prot, {}).update(sups)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    a, b = load(argv[0]), load(argv[1])
    n, diffs, runs = 0, [], []
    for ds, per in b.items():
        for prot, sups in per.items():
            for sup, r in sups.items():
                ra = a.get(ds, {}).get(prot, {}).get(sup)
                if ra is None:
                    continue
                runs.append(f"{ds} {prot} {sup}")
                for cls, v in r["classes"].items():
                    for case, d in v["cases"].items():
                        n += 1
                        before = ra["classes"][cls]["cases"][case]
                        if before != d:
                            diffs.append(f"{ds} {prot} support {sup} {cls} case {case}: {before} -> {d}")
    print(f"compared {n} per-case Dice values over {len(runs)} runs: {n - len(diffs)} identical, {len(diffs)} differ")
    print("runs: " + ", ".join(runs))
    for line in diffs:
        print("  " + line)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

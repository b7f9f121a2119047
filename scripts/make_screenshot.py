"""Regenerate the top-level screenshot.png from a real run of the pipeline.

    .venv/bin/python scripts/make_screenshot.py

It runs the demo (TotalSegmentator example CT, one annotated slice each of liver and spleen,
embedded LiteMedSAM + shipped FoB weights) and draws the support slices with their
background rings, query slices with predicted and reference contours and prompts, and a 3D
view of each segmented organ.  It is a figure of real output, not a Slicer window.
"""

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FoBSegment"))

from FoBSegmentLib.demo import run_demo  # noqa: E402

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        report = run_demo(tmp, figure_name="screenshot.png", with_3d=True, cache_dir=REPO / "runs" / "cache")
        shutil.copy(report["figure"], REPO / "screenshot.png")
    print(f"wrote {REPO / 'screenshot.png'}")

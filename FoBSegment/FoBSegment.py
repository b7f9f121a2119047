"""FoBSegment: one-shot segmentation of a structure through a volume from one painted slice.

The user paints the structure on one slice (Segment Editor); a SAM-family model, steered by
FoB background prompts, segments it on every other slice.  The computation lives in
``FoBSegmentLib`` (plain Python, tested without Slicer); this file is the Slicer GUI and the
logic a Python-console user calls::

    logic = slicer.util.getModuleLogic("FoBSegment")
    newSegmentIds = logic.process(volumeNode, segmentationNode, segmentId)

No torch, no model and no pip at import time: dependencies are checked at the first Apply.
"""

import logging
import os
import pathlib
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from FoBSegmentLib.backbones import BACKBONES  # noqa: E402 - the catalogue; imports no torch

BACKBONE_CHOICES = list(BACKBONES)
DEVICE_CHOICES = ["auto", "cpu", "cuda"]

REPOSITORY_URL = "https://github.com/fobsegment/SlicerFoBSegment"


#
# FoBSegment
#


class FoBSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FoB Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch (an extension) is checked at the first Apply
        self.parent.contributors = ["FoBSegment developers"]
        self.parent.helpText = _(
            "One-shot segmentation: paint a structure on one slice of a volume (or of another "
            "patient's volume) and FoBSegment segments it through the whole volume with a SAM-family "
            "model steered by FoB background prompts. The result is added as a new segment "
            "&quot;&lt;name&gt; (FoB)&quot;; delete it to undo. "
            f'See the <a href="{REPOSITORY_URL}">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Uses LiteMedSAM (Ma et al., MedSAM, Nature Communications 2024) and Segment Anything "
            "(Kirillov et al., ICCV 2023). Test data: TotalSegmentator example CT (Apache-2.0), "
            "CHAOS and MS-CMRSeg challenge data (research use)."
        )


#
# Parameter node
#


@parameterNodeWrapper
class FoBSegmentParameterNode:
    """
    inputVolume: the volume to segment.
    supportVolume: the volume the support was painted on (None: the input volume).
    supportSegmentation, supportSegmentId: the painted support segment.
    allSegments: segment every segment of the support segmentation.
    outputSegmentation: where the results go (None: support segmentation or a new one).
    backbone, device: model options.
    restrictSliceRange, firstSlice, lastSlice: optional range along the acquisition axis.
    showPrompts: show the prompts as markups.
    checkpointPath: a local checkpoint file (for offline computers).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    supportVolume: vtkMRMLScalarVolumeNode
    supportSegmentation: vtkMRMLSegmentationNode
    supportSegmentId: str = ""
    allSegments: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    backbone: Annotated[str, Choice(BACKBONE_CHOICES)] = "litemedsam"
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    restrictSliceRange: bool = False
    firstSlice: Annotated[int, WithinRange(0, 100000)] = 0
    lastSlice: Annotated[int, WithinRange(0, 100000)] = 0
    showPrompts: bool = False
    checkpointPath: pathlib.Path = pathlib.Path("")


#
# Widget
#


class FoBSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: every computation is in FoBSegmentLogic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._runStart = 0.0
        self._dependenciesChecked = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FoBSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FoBSegmentLogic()
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.editSupportButton.connect("clicked(bool)", self.onEditSupportButton)
        self.ui.supportSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSupportSegmentationChanged)
        self.ui.supportSegmentSelector.connect("currentSegmentChanged(QString)", self.onSupportSegmentChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -------------------------------------------------------------- parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                p.inputVolume = first
        if not p.supportSegmentation:
            seg = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if seg:
                p.supportSegmentation = seg
        self.onInputVolumeChanged(p.inputVolume)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
            self._updateGUI()

    def _updateGUI(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        # the segment selector is not bound by connectGui: keep it in sync by hand
        selector = self.ui.supportSegmentSelector
        wasBlocked = selector.blockSignals(True)
        if selector.currentNode() != p.supportSegmentation:
            selector.setCurrentNode(p.supportSegmentation)
        if p.supportSegmentId and selector.currentSegmentID() != p.supportSegmentId:
            selector.setCurrentSegmentID(p.supportSegmentId)
        selector.blockSignals(wasBlocked)

        self.ui.firstSliceSpinBox.enabled = p.restrictSliceRange
        self.ui.lastSliceSpinBox.enabled = p.restrictSliceRange
        if self._running:
            self.ui.applyButton.enabled = True
            return
        hasSegment = bool(p.supportSegmentation) and (p.allSegments or bool(self._currentSegmentId()))
        if p.inputVolume and hasSegment:
            self.ui.applyButton.toolTip = _("Segment the painted structure through the volume.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select a volume and the segment painted on one of its slices.")
            self.ui.applyButton.enabled = False

    def _currentSegmentId(self) -> str:
        sid = self.ui.supportSegmentSelector.currentSegmentID()
        return sid or (self._parameterNode.supportSegmentId if self._parameterNode else "")

    def onSupportSegmentationChanged(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.supportSegmentation = node

    def onSupportSegmentChanged(self, segmentId) -> None:
        if self._parameterNode:
            self._parameterNode.supportSegmentId = segmentId or ""

    def onInputVolumeChanged(self, node) -> None:
        n = 0
        if node is not None:
            try:
                from FoBSegmentLib.slicer_adapter import acquisition_slice_count

                n = acquisition_slice_count(node)
            except Exception:  # e.g. a non-linear transform: reported at Apply
                n = 0
        top = max(0, n - 1)
        for spin in (self.ui.firstSliceSpinBox, self.ui.lastSliceSpinBox):
            spin.maximum = top if n else 100000
        if self._parameterNode and n and not self._parameterNode.restrictSliceRange:
            self._parameterNode.firstSlice = 0
            self._parameterNode.lastSlice = top

    # -------------------------------------------------------------- actions
    def onEditSupportButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not open the Segment Editor."), waitCursor=True):
            p = self._parameterNode
            volume = p.supportVolume or p.inputVolume
            segmentation = p.supportSegmentation
            if segmentation is None:
                segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FoB support")
                segmentation.CreateDefaultDisplayNodes()
                if volume is not None:
                    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
                p.supportSegmentation = segmentation
            if segmentation.GetSegmentation().GetNumberOfSegments() == 0:
                p.supportSegmentId = segmentation.GetSegmentation().AddEmptySegment("", _("Structure"))
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(segmentation)
            if volume is not None:
                if hasattr(editor, "setSourceVolumeNode"):
                    editor.setSourceVolumeNode(volume)
                else:  # Slicer < 5.3
                    editor.setMasterVolumeNode(volume)
            if p.supportSegmentId:
                editor.setCurrentSegmentID(p.supportSegmentId)
            editor.setActiveEffectByName("Paint")

    def onApplyButton(self) -> None:
        if self._running:
            self._cancelRequested = True
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling after the current slice...")
            return
        with slicer.util.tryWithErrorDisplay(_("FoBSegment failed."), waitCursor=True):
            if not self._dependenciesChecked:
                self.logic.setupDependencies(askConfirmation=True)
                self._dependenciesChecked = True
            self._run()

    def _run(self) -> None:
        from FoBSegmentLib.errors import CancelledError

        p = self._parameterNode
        segmentIds = None
        if p.allSegments:
            seg = p.supportSegmentation.GetSegmentation()
            segmentIds = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
        sliceRange = (p.firstSlice, p.lastSlice) if p.restrictSliceRange else None
        checkpoint = str(p.checkpointPath) if str(p.checkpointPath) not in ("", ".") else None

        self._running, self._cancelRequested = True, False
        self._setInputsEnabled(False)
        self._runStart = time.time()
        self.ui.applyButton.text = _("Cancel")
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Loading the model...")
        slicer.app.processEvents()
        try:
            newIds = self.logic.process(
                p.inputVolume, p.supportSegmentation, self._currentSegmentId(),
                outputSegmentationNode=p.outputSegmentation, supportVolumeNode=p.supportVolume,
                backbone=p.backbone, device=p.device, sliceRange=sliceRange,
                showPrompts=p.showPrompts, checkpointPath=checkpoint,
                progressCallback=self._onProgress, isCancelled=self._isCancelled, segmentIds=segmentIds,
                downloadProgressCallback=self._onDownloadProgress)
            run = self.logic.lastRun
            res = run.results[0] if run and run.results else None
            seconds = time.time() - self._runStart
            msg = _("Added {n} segment(s) in {s:.0f} s").format(n=len(newIds), s=seconds)
            if res is not None:
                msg += _(" ({k} slices, {dev}). Delete the segment to undo.").format(
                    k=res.slices_segmented, dev=res.device)
            self.ui.statusLabel.text = msg
        except CancelledError:
            self.ui.statusLabel.text = _("Cancelled; nothing was written.")
        finally:
            self._running = False
            self._setInputsEnabled(True)
            self.ui.applyButton.text = _("Apply")
            self.ui.progressBar.hide()
            self._updateGUI()

    def _setInputsEnabled(self, enabled: bool) -> None:
        """No edits of the inputs while a run processes events between slices."""
        for w in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                  self.ui.advancedCollapsibleButton):
            w.enabled = enabled

    def _isCancelled(self) -> bool:
        return self._cancelRequested

    def _onProgress(self, done: int, total: int) -> None:
        total = max(1, int(total))
        self.ui.progressBar.setMaximum(total)
        self.ui.progressBar.setValue(int(done))
        elapsed = time.time() - self._runStart
        text = _("Slice {done} of {total}").format(done=done, total=total)
        if 0 < done < total:
            left = elapsed / done * (total - done)
            text += _(", about {s:.0f} s left").format(s=left)
        self.ui.progressBar.setFormat(text)
        self.ui.statusLabel.text = text
        slicer.app.processEvents()  # keep Slicer responsive, let Cancel through

    def _onDownloadProgress(self, done: int, total) -> None:
        if total:
            self.ui.progressBar.setMaximum(1000)
            self.ui.progressBar.setValue(int(1000 * done / total))
        self.ui.progressBar.setFormat(_("Downloading the model: {mb:.0f} MB").format(mb=done / 1e6))
        slicer.app.processEvents()


#
# Logic
#


class FoBSegmentLogic(ScriptedLoadableModuleLogic):
    """Everything a Python-console user needs; no widget references.

    Keeps one ``Segmenter`` per (backbone, device, checkpoint) so that image embeddings are
    cached across runs (painting again and re-running is fast).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenters = {}
        self.lastRun = None

    def getParameterNode(self):
        return FoBSegmentParameterNode(super().getParameterNode())

    # -------------------------------------------------------------- dependencies
    @staticmethod
    def moduleDir() -> str:
        return os.path.dirname(os.path.abspath(__file__))

    def requirementsPath(self) -> str:
        return os.path.join(self.moduleDir(), "Resources", "requirements.txt")

    def setupDependencies(self, askConfirmation: bool = True) -> None:
        """torch through the PyTorch extension, the rest from Resources/requirements.txt.
        Called at the first Apply (never at start-up); pip runs on the main thread."""
        self.ensureTorch(askConfirmation)
        self.ensurePythonPackages(askConfirmation)

    @staticmethod
    def ensureTorch(askConfirmation: bool = True):
        try:
            import PyTorchUtils  # provided by the PyTorch extension
        except ImportError:
            raise RuntimeError(
                _("FoBSegment needs PyTorch: install the PyTorch extension from the Extensions "
                  "Manager, restart Slicer, then click Apply again.")
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=askConfirmation)
            if torch is None:
                raise RuntimeError(
                    _("PyTorch is required. Install it with the PyTorch Util module (or accept the "
                      "installation prompt), then click Apply again.")
                )
        import torch

        return torch

    def missingRequirements(self) -> list:
        """Requirement lines of requirements.txt that are not satisfied (Slicer 5.10 path)."""
        import importlib.metadata

        from packaging.requirements import Requirement

        missing = []
        with open(self.requirementsPath(), encoding="utf-8") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                req = Requirement(line)
                try:
                    version = importlib.metadata.version(req.name)
                except importlib.metadata.PackageNotFoundError:
                    missing.append(line)
                    continue
                if req.specifier and not req.specifier.contains(version, prereleases=True):
                    missing.append(line)
        return missing

    def ensurePythonPackages(self, askConfirmation: bool = True) -> None:
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.12
            requirements = packaging.load_requirements(self.requirementsPath())
            packaging.pip_ensure(requirements, requester="FoBSegment")
        missing = self.missingRequirements()
        if not missing:
            return
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            raise RuntimeError(_("Required Python packages are not installed: {p}").format(p=", ".join(missing)))
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("FoBSegment needs these Python packages, which will now be installed:\n\n{p}\n\n"
              "This can take a few minutes.").format(p="\n".join(missing)),
            windowTitle=_("FoBSegment: install Python packages"),
        ):
            raise RuntimeError(_("FoBSegment cannot run without: {p}").format(p=", ".join(missing)))
        slicer.util.pip_install(missing)
        still = self.missingRequirements()
        if still:
            raise RuntimeError(_("Installing {p} failed; see the Python console.").format(p=", ".join(still)))

    # -------------------------------------------------------------- model
    def getSegmenter(self, backbone="litemedsam", device="auto", checkpointPath=None,
                     downloadProgressCallback=None, isCancelled=None):
        """The cached ``Segmenter`` for (backbone, device, checkpoint), created on first use."""
        from FoBSegmentLib import Segmenter  # imports torch: only here

        key = (backbone, device, str(checkpointPath) if checkpointPath else None)
        segmenter = self._segmenters.get(key)
        if segmenter is None:
            segmenter = Segmenter(backbone=backbone, device=device, checkpoint=checkpointPath,
                                  download_progress=downloadProgressCallback, is_cancelled=isCancelled)
            self._segmenters[key] = segmenter
        return segmenter

    def clearCache(self) -> None:
        """Forget the loaded models and their embedding caches (frees memory)."""
        self._segmenters.clear()

    # -------------------------------------------------------------- the computation
    def process(self, volumeNode, supportSegmentationNode, segmentId, outputSegmentationNode=None,
                supportVolumeNode=None, backbone="litemedsam", device="auto", sliceRange=None,
                showPrompts=False, checkpointPath=None, progressCallback=None, isCancelled=None,
                segmentIds=None, downloadProgressCallback=None) -> list:
        """Segment ``volumeNode`` from the painted segment(s) and return the new segment ids.

        :param volumeNode: the volume to segment.
        :param supportSegmentationNode: the segmentation holding the painted support.
        :param segmentId: the painted segment (or use ``segmentIds`` for several at once).
        :param outputSegmentationNode: where the results go; None: the support segmentation when
            the support was painted on ``volumeNode``, otherwise a new segmentation node.
        :param supportVolumeNode: the volume the support was painted on (None: ``volumeNode``).
        :param backbone: ``litemedsam`` (offline, default), ``sam_vit_b``/``_l``/``_h``, ``medsam_vit_b``.
        :param device: ``auto``, ``cpu`` or ``cuda``.
        :param sliceRange: (first, last) slice indices along the acquisition axis, inclusive.
        :param showPrompts: add the prompts as markups (green foreground, red background).
        :param checkpointPath: a local checkpoint file instead of the embedded/downloaded one.
        :param progressCallback: ``callable(done, total)`` called after each slice.
        :param isCancelled: ``callable() -> bool``; True stops the run (``CancelledError``), nothing written.
        :return: list of new segment ids, one per support segment, named "<name> (FoB)".
        """
        from FoBSegmentLib import slicer_adapter

        start = time.time()
        segmenter = self.getSegmenter(backbone, device, checkpointPath, downloadProgressCallback, isCancelled)
        run = slicer_adapter.run_on_nodes(
            slicer.mrmlScene, volumeNode, supportSegmentationNode, segmentId, outputSegmentationNode, segmenter,
            supportVolumeNode=supportVolumeNode, segmentIds=segmentIds, slice_range=sliceRange,
            show_prompts=showPrompts, progress=progressCallback, is_cancelled=isCancelled)
        self.lastRun = run
        for res in run.results:
            logging.info(
                f"FoBSegment: {res.slices_segmented} slices segmented, {res.slices_encoded} encoded, "
                f"backbone {segmenter.backbone.name} on {res.device}")
        logging.info(f"FoBSegment: finished in {time.time() - start:.1f} s")
        return run.segment_ids


#
# Test (runs inside Slicer)
#


class FoBSegmentTest(ScriptedLoadableModuleTest):
    """In-Slicer tests. The model test needs PyTorch (not installed by the test); the test on the
    real example CT runs when FoBSegment/Testing/Data is present (source or build tree) or when
    FOBSEGMENT_TEST_IMAGE / FOBSEGMENT_TEST_LABEL point at an image and its label map."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_FoBSegment_conversion()
        self.setUp()
        self.test_FoBSegment_logic()

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _testData():
        image = os.environ.get("FOBSEGMENT_TEST_IMAGE")
        label = os.environ.get("FOBSEGMENT_TEST_LABEL")
        if image and label:
            return image, label, int(os.environ.get("FOBSEGMENT_TEST_LABEL_VALUE", "1"))
        here = os.path.dirname(os.path.abspath(__file__))
        for base in (here, os.path.join(here, "..", "..", "..", "FoBSegment")):
            data = os.path.join(base, "Testing", "Data")
            if os.path.isfile(os.path.join(data, "example_ct.nii.gz")):
                return os.path.join(data, "example_ct.nii.gz"), os.path.join(data, "example_seg.nii.gz"), 5
        return None

    def _syntheticVolume(self):
        """A bright ellipsoid in noise, 4 mm slices: no download needed."""
        import numpy as np

        rng = np.random.default_rng(0)
        k, j, i = np.mgrid[0:16, 0:96, 0:96]
        inside = ((i - 48) / 26.0) ** 2 + ((j - 46) / 20.0) ** 2 + ((k - 8) / 7.0) ** 2 <= 1.0
        array = (rng.normal(100, 15, inside.shape) + 300 * inside).astype(np.int16)
        volumeNode = slicer.util.addVolumeFromArray(array, nodeClassName="vtkMRMLScalarVolumeNode", name="synthetic")
        volumeNode.SetSpacing(1.0, 1.0, 4.0)
        return volumeNode, inside

    @staticmethod
    def _sliceView(volumeNode):
        from FoBSegmentLib import slicer_adapter
        from FoBSegmentLib.geometry import SliceView

        return SliceView.for_volume(slicer_adapter.volume_from_node(volumeNode))

    def _supportFromReference(self, volumeNode, reference, sliceIndex):
        """Paint the reference on one slice (along the acquisition axis) into a new segmentation."""
        import numpy as np

        view = self._sliceView(volumeNode)
        stack = view.to_stack(reference)
        paintedStack = np.zeros(stack.shape, np.uint8)
        paintedStack[sliceIndex] = stack[sliceIndex]
        painted = np.ascontiguousarray(view.from_stack(paintedStack))
        labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "painted")
        slicer.util.updateVolumeFromArray(labelNode, painted)
        labelNode.CopyOrientation(volumeNode)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "support")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segmentationNode)
        slicer.mrmlScene.RemoveNode(labelNode)
        segmentId = segmentationNode.GetSegmentation().GetNthSegmentID(0)
        segmentationNode.GetSegmentation().GetSegment(segmentId).SetName("organ")
        return segmentationNode, segmentId

    # ---------------------------------------------------------------- tests
    def test_FoBSegment_conversion(self):
        """Node <-> FoBSegmentLib conversions (no model)."""
        import numpy as np

        from FoBSegmentLib import slicer_adapter

        self.delayDisplay("Conversion test")
        volumeNode, inside = self._syntheticVolume()
        volume = slicer_adapter.volume_from_node(volumeNode)
        self.assertEqual(volume.array.shape, inside.shape)
        segmentationNode, segmentId = self._supportFromReference(volumeNode, inside, 8)
        mask = slicer_adapter.segment_mask_on_volume(segmentationNode, segmentId, volumeNode)
        view = self._sliceView(volumeNode)
        self.assertTrue(np.array_equal(view.to_stack(mask)[8], view.to_stack(inside)[8]))
        newId = slicer_adapter.write_mask_as_segment(inside, volumeNode, segmentationNode, "organ (FoB)", (1, 0, 0))
        back = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, newId, volumeNode)
        self.assertTrue(np.array_equal(back > 0, inside))
        self.delayDisplay("Conversion test passed")

    def test_FoBSegment_logic(self):
        """Paint one slice from a reference label, run the logic, check Dice."""
        try:
            FoBSegmentLogic.ensureTorch(askConfirmation=False)
        except Exception as exc:  # do not install anything from a test
            self.delayDisplay(f"Skipping the model test: {exc}")
            return
        import numpy as np

        data = self._testData()
        if data is not None:
            self.delayDisplay(f"Loading {data[0]}")
            volumeNode = slicer.util.loadVolume(data[0])
            labelNode = slicer.util.loadLabelVolume(data[1])
            reference = slicer.util.arrayFromVolume(labelNode) == data[2]
            slicer.mrmlScene.RemoveNode(labelNode)
        else:
            volumeNode, reference = self._syntheticVolume()
        view = self._sliceView(volumeNode)
        refStack = view.to_stack(reference)
        sliceIndex = int(np.argmax(refStack.sum(axis=(1, 2))))
        first = max(0, sliceIndex - 4)
        last = min(refStack.shape[0] - 1, sliceIndex + 4)
        segmentationNode, segmentId = self._supportFromReference(volumeNode, reference, sliceIndex)

        logic = FoBSegmentLogic()
        ticks = []
        newIds = logic.process(volumeNode, segmentationNode, segmentId, device="cpu",
                               sliceRange=(first, last), progressCallback=lambda d, t: ticks.append(d))
        self.assertEqual(len(newIds), 1)
        segment = segmentationNode.GetSegmentation().GetSegment(newIds[0])
        self.assertEqual(segment.GetName(), "organ (FoB)")
        result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, newIds[0], volumeNode) > 0
        from FoBSegmentLib.evaluation import dice as dice_of

        dice = dice_of(view.to_stack(result)[first:last + 1], refStack[first:last + 1])
        self.delayDisplay(f"Dice {dice:.3f} on slices {first}-{last}")
        self.assertGreater(dice, 0.6)
        self.assertTrue(ticks)
        self.delayDisplay("Logic test passed")

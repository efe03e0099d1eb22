"""A CNN lesion segmenter beside the ViT's head: MONAI's DynUNet (configured the nnU-Net way) or SegResNet.

    x [B, C + 1, S, S, S] ([images..., lesion mask], the crop the ViT head reads)
      -> the image channels alone [B, C, S, S, S] (the mask is the target, never an input)
      -> DynUNet / SegResNet -> lesion logits [B, 1, S, S, S]

It keeps MultimodalModel's segmentation contract (`segment(x)`, `forward(x, clinical, scale)` ->
{"seg_logits"}), so fine-tuning's fold loop, the DiceCE loss, the segmentation report and the whole-head
sliding-window search (finetune/lesion/search.py) use it unchanged. It saves as an HF-format folder
(config.json with model_type CNN_MODEL_TYPE, model.safetensors, input_spec.json) and loads strictly;
`load_fold_model` reads either kind of fine-tuned folder by its config.json.

DynUNet follows nnU-Net's plan: kernel 3, strides halving every axis until the feature map would fall
below 4 voxels (at most 5 times), filters doubling from `width` up to 320, instance norm, leaky ReLU,
deep supervision off (its extra heads cost memory; the DiceCE loss reads the full-resolution output only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from core.config import from_dict, to_dict
from core.errors import ConfigError, InputError
from models.hf import load_model_folder, read_json, save_model_folder
from models.input_spec import InputSpec
from models.tasks import SEGMENTATION

CNN_ARCHS = ("dynunet", "segresnet")
CNN_MODEL_TYPE = "mimfm-cnn-segmenter"
MAX_POOLINGS = 5  # nnU-Net's 3D plans stop at five halvings
MIN_FEATURE_MAP = 4  # nnU-Net's smallest bottleneck edge, in voxels
MAX_FILTERS = 320  # nnU-Net's cap on a stage's channels
SEGRESNET_DOWN = 3  # SegResNet's default blocks_down (1, 2, 2, 4) halves the input three times
NORM = ("INSTANCE", {"affine": True})  # nnU-Net's choice: batch statistics of a few 3D crops are too noisy


def dynunet_plan(size, spacing_mm) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's kernels and strides for a patch of `size` voxels (per axis) of `spacing_mm` (per axis), as
    MONAI's DynUNet tutorial derives them: an axis is halved while its spacing is within 2x the finest and
    its feature map stays at least MIN_FEATURE_MAP (and even, so the skips line up); its kernel is 1 while
    it is over 2x coarser than the finest axis, else 3. Returns (kernels, strides), one per stage."""
    sizes, spacings = [int(s) for s in size], [float(s) for s in spacing_mm]
    kernels, strides = [], [[1] * len(sizes)]
    for _ in range(MAX_POOLINGS):
        ratio = [sp / min(spacings) for sp in spacings]
        stride = [2 if r <= 2 and s >= 2 * MIN_FEATURE_MAP and s % 2 == 0 else 1 for r, s in zip(ratio, sizes)]
        if all(s == 1 for s in stride):
            break
        kernels.append([3 if r <= 2 else 1 for r in ratio])
        strides.append(stride)
        sizes = [s // k for s, k in zip(sizes, stride)]
        spacings = [sp * k for sp, k in zip(spacings, stride)]
    kernels.append([3] * len(sizes))  # the bottleneck
    return kernels, strides


@dataclass
class CNNSegConfig:
    arch: Literal["dynunet", "segresnet"] = "dynunet"
    in_channels: int = 1          # image channels (the mask channel of the input is dropped before the net)
    img_size: int = 48            # the crop edge it trains and slides at (voxels)
    voxel_mm: float = 1.0         # the edge of one of those voxels (mm): with img_size, the DynUNet plan
    width: int = 16               # channels of the finest stage, doubling per coarser stage (nnU-Net: 32)
    kernels: list[list[int]] = field(default_factory=list)  # DynUNet: planned by dynunet_plan when empty
    strides: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        if self.arch not in CNN_ARCHS:
            raise ConfigError(f"--seg_arch {self.arch!r}: a CNN segmenter is one of {list(CNN_ARCHS)}")
        if self.in_channels < 1 or self.width < 1 or self.img_size < 1 or self.voxel_mm <= 0:
            raise ConfigError(f"CNN segmenter: in_channels, width, img_size and voxel_mm must be positive, got "
                              f"{self.in_channels}, {self.width}, {self.img_size}, {self.voxel_mm}")
        if self.arch == "dynunet" and not self.strides:
            self.kernels, self.strides = dynunet_plan([self.img_size] * 3, [self.voxel_mm] * 3)
        if self.arch == "dynunet" and len(self.strides) < 2:
            raise ConfigError(f"--seg_arch dynunet: a crop of {self.img_size} voxels cannot be halved even once "
                              f"(it needs an even edge of at least {2 * MIN_FEATURE_MAP})")
        if self.arch == "segresnet" and self.img_size % 2 ** SEGRESNET_DOWN:
            raise ConfigError(f"--seg_arch segresnet halves the crop {SEGRESNET_DOWN} times: the input size "
                              f"{self.img_size} must be a multiple of {2 ** SEGRESNET_DOWN}")

    # What the fine-tuning loop and predict ask of a model's config (MultimodalConfig answers the same).
    task = SEGMENTATION.name
    fusion = "none"
    segments = True
    predicts_outcome = False
    uses_image = True
    uses_clinical = False


class CNNSegmenter(nn.Module):
    def __init__(self, config: CNNSegConfig):
        super().__init__()
        self.config = config
        self.encoder = None  # no pretrained encoder: the loop's encoder-only schedules pass it by
        self.net = build_net(config)

    def segment(self, x: Tensor) -> Tensor:
        """x [B, C + 1, S, S, S] -> lesion logits [B, 1, S, S, S] from the image channels alone."""
        c = self.config.in_channels
        if x.ndim != 5 or x.shape[1] != c + 1:
            raise InputError(f"CNN segmenter input: expected [B, {c + 1}, S, S, S] (images, then the mask), "
                             f"got {tuple(x.shape)}")
        return self.net(x[:, :c])  # [B, 1, S, S, S]

    def forward(self, x: Tensor, clinical: Tensor | None = None, scale: Tensor | None = None) -> dict[str, Tensor]:
        """The fold loop's call (clinical data and scale are not read): {"seg_logits": [B, 1, S, S, S]}."""
        return {"seg_logits": self.segment(x)}

    # ---- optimisation: one layer, as MultimodalModel's clinical-only model ------------------------

    def encoder_parameters(self) -> list[nn.Parameter]:
        return []

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """Two groups at `lr` (layer decay has no encoder to act on): weights with decay; biases and norm
        parameters (1-D) without."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
        return [{"params": ps, "lr": lr, "lr_scale": 1.0, "weight_decay": wd}
                for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]

    # ---- save / load ------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, *, extra_config: dict, card: dict, input_spec: InputSpec) -> None:
        """An HF-format folder: config.json = {"model_type", "architectures", "cnn": CNNSegConfig,
        **extra_config}, model.safetensors, README.md and input_spec.json."""
        use = (f"Research model: MONAI {self.config.arch} predicting the lesion mask from the image channels "
               f"({', '.join(input_spec.channels[:-1])}) of {self.config.img_size}^3 crops; the whole-head search "
               "of finetune.predict --seg_model slides it over a head.")
        how = ("With mimfm installed (strict key matching; safetensors only):\n\n```python\n"
               "from models.cnn_segmenter import CNNSegmenter\n"
               "model, config = CNNSegmenter.from_pretrained(\"path/to/this/folder\")\n```\n")
        card = {"title": f"mimfm CNN lesion segmenter ({self.config.arch})", "intended_use": use, "how_to_load": how,
                "tags": ("medical-imaging", "3d", "segmentation", "cnn"), **card}
        # the card's "Model" section reads top-level keys: the CNN's own
        save_model_folder(folder, self, model_type=CNN_MODEL_TYPE, architecture="CNNSegmenter", section="cnn",
                          section_config=to_dict(self.config), extra_config=extra_config, card=card,
                          card_shape=to_dict(self.config), input_spec=input_spec)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> tuple["CNNSegmenter", dict]:
        """Load a folder written by save_pretrained, with strict key and shape matching."""
        return load_model_folder(folder, model_type=CNN_MODEL_TYPE, section="cnn",
                                 build=lambda cnn, where: cls(from_dict(CNNSegConfig, cnn, where)))


def build_net(c: CNNSegConfig) -> nn.Module:
    """The MONAI network a CNNSegConfig names, one foreground logit out."""
    from monai.networks.nets import DynUNet, SegResNet
    if c.arch == "segresnet":
        return SegResNet(spatial_dims=3, init_filters=c.width, in_channels=c.in_channels, out_channels=1, norm=NORM)
    filters = [min(c.width * 2 ** i, MAX_FILTERS) for i in range(len(c.strides))]
    return DynUNet(3, c.in_channels, 1, kernel_size=c.kernels, strides=c.strides, upsample_kernel_size=c.strides[1:],
                   filters=filters, norm_name=NORM, deep_supervision=False)


def load_fold_model(folder: str | Path) -> tuple[nn.Module, dict]:
    """(model, its config.json) of a fine-tuned folder of either kind, by config.json's model_type: a
    MultimodalModel (the ViT, with or without a segmentation head) or a CNNSegmenter. Any other folder
    (a pretrained encoder, another tool's) is one InputError naming both kinds."""
    from models.multimodal import MODEL_TYPE, MultimodalModel
    path = Path(folder) / "config.json"
    kind = read_json(path).get("model_type") if path.is_file() else None
    if kind == CNN_MODEL_TYPE:
        return CNNSegmenter.from_pretrained(folder)
    if kind in (MODEL_TYPE, None):  # None: no config.json, which the fine-tuned model's loader names
        return MultimodalModel.from_pretrained(folder)
    raise InputError(f"{folder}: config.json's model_type {kind!r} is neither a fine-tuned model ({MODEL_TYPE}) "
                     f"nor a CNN segmenter ({CNN_MODEL_TYPE}); pass the model/ folder of a python -m finetune run")

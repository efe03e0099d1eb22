"""Self-distillation inside MiM: an EMA teacher's token distributions as a second target (DINO / iBOT).

Reconstruction teaches the encoder the intensity layout of masked patches; a linear read-out of frozen
features needs more than that. With `DistillConfig.weight > 0` MiMModel also learns to predict, at
each masked position and for each child sub-volume, what an EMA teacher that sees the whole,
differently augmented view assigns there:

- masked-token distillation (iBOT): the student's decoder feature at a masked position predicts the
  teacher's token distribution at that position;
- cross-level distillation (MiM's alignment with a teacher): a child's pooled student feature predicts
  the teacher's distribution for its parent region, and the parent region's pooled student feature
  predicts the teacher's distribution for the child.

The teacher's output is centred (an EMA, over optimizer steps, of the global batch's mean) and sharpened
(a temperature warmed up from `teacher_temp_start` to `teacher_temp`), which keeps it from collapsing to
one prototype or to the uniform distribution; its weights follow the student by EMA with a momentum
that rises to 1 on a cosine. Reconstruction keeps its own weight; weight 0 builds none of this and is
plain MiM.

Written here rather than taken from facebookresearch/dino or ibot (DINOHead, DINOLoss): those are not
packaged, and MiM's teacher sees sub-volume hierarchies, not image crops. The maths is theirs.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError


@dataclass
class DistillConfig:
    weight: float = 0.0              # weight of the distillation terms beside reconstruction; 0: plain MiM
    masked_weight: float = 1.0       # iBOT's masked-token term, inside the distillation loss
    cross_weight: float = 1.0        # the cross-level terms (child <-> parent region), inside it
    prototypes: int = 256            # the DINO head's output size
    head_hidden: int = 256           # its MLP's hidden width
    head_bottleneck: int = 64        # the feature it compares with the (unit-norm) prototypes
    student_temp: float = 0.1        # softmax temperature of the student's prediction
    teacher_temp_start: float = 0.04  # the teacher's temperature at step 0 (DINO's warm-up) ...
    teacher_temp: float = 0.07       # ... and after teacher_temp_steps
    teacher_temp_steps: int = 500    # steps of the linear warm-up
    center_momentum: float = 0.9     # EMA of the teacher's batch mean, subtracted before sharpening
    momentum: float = 0.996          # the teacher's EMA momentum at step 0; a cosine takes it to 1
    intensity_jitter: float = 0.2    # the teacher's view: x (1 + a) + b with a, b ~ U(-j, j) per sample ...
    noise: float = 0.1               # ... plus Gaussian noise of this SD (in prepared intensity units)
    # What the teacher's head reads. "encoder": its encoder's tokens (DINO / iBOT, where the student's head
    # reads encoder tokens too). "decoder": an EMA copy of the decoder and projection as well, run on the
    # whole view, so the teacher's head sees the kind of feature the student's head was trained on.
    teacher_features: str = "encoder"

    def __post_init__(self):
        if self.weight < 0 or self.masked_weight < 0 or self.cross_weight < 0:
            raise ConfigError("distill weights must be >= 0")
        if not (0 < self.student_temp and 0 < self.teacher_temp_start and 0 < self.teacher_temp):
            raise ConfigError("distill temperatures must be > 0")
        if not 0 <= self.center_momentum < 1 or not 0 <= self.momentum <= 1:
            raise ConfigError("distill.center_momentum must be in [0, 1) and distill.momentum in [0, 1]")
        if self.prototypes < 2 or self.head_hidden < 1 or self.head_bottleneck < 1:
            raise ConfigError("distill.prototypes must be >= 2 and the head widths >= 1")
        if self.teacher_features not in ("encoder", "decoder"):
            raise ConfigError(f"distill.teacher_features must be encoder or decoder, got {self.teacher_features!r}")

    def teacher_temperature(self, step: int) -> float:
        if step >= self.teacher_temp_steps:
            return self.teacher_temp
        return self.teacher_temp_start + (self.teacher_temp - self.teacher_temp_start) * step / self.teacher_temp_steps

    def ema_momentum(self, step: int, max_steps: int) -> float:
        """DINO's schedule: momentum + (1 - momentum) (1 - cos(pi step / max_steps)) / 2, rising to 1."""
        t = min(1.0, step / max(1, max_steps))
        return 1.0 - (1.0 - self.momentum) * (math.cos(math.pi * t) + 1) / 2


class CentreSums:
    """The rows a running centre [S, K] moves toward (S slots, e.g. one per child level), summed over the
    micro-batches of one optimizer step; `apply` all-reduces the sums and counts across ranks and moves the
    centre once. What a loss sees then depends on the global batch of an optimizer step, not on the per-GPU
    batch or on gradient accumulation. A plain object, not buffers: DDP broadcasts rank 0's buffers at every
    forward, which would overwrite the other ranks' sums; and nothing of it outlives a step, so checkpoints
    need none of it."""

    def __init__(self, slots: int, width: int):
        self.slots, self.width = slots, width
        self.total: Tensor | None = None  # [S, K + 1] float32: each slot's row sum, then its row count

    def reset(self) -> None:
        """Forget the rows added so far: a skipped (non-finite) step's forwards must not move the centre."""
        self.total = None

    @torch.no_grad()
    def add(self, slot: int, rows: Tensor) -> None:
        """Add rows [R, K] (detached) to slot `slot`."""
        if self.total is None:
            self.total = torch.zeros(self.slots, self.width + 1, device=rows.device)
        self.total[slot, :-1] += rows.detach().float().sum(dim=0)
        self.total[slot, -1] += rows.shape[0]

    @torch.no_grad()
    def apply(self, center: Tensor, momentum: float, first_sets: bool = False) -> None:
        """center [S, K] <- m center + (1 - m) (mean of the rows added since the last reset, over every rank),
        then reset. A slot no rank saw keeps its value. first_sets: a slot still exactly zero (never moved)
        takes the mean itself, as an EMA that starts from zero is biased toward zero for ~1 / (1 - m) steps.
        A collective when torch.distributed is initialised: every rank calls it (the loop calls it after
        every step taken, and a step is skipped alike on every rank)."""
        total = self.total if self.total is not None else torch.zeros(self.slots, self.width + 1, device=center.device)
        self.total = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        count = total[:, -1:]                                  # [S, 1]
        mean = total[:, :-1] / count.clamp_min(1)              # [S, K]
        m = torch.full_like(count, momentum)                   # [S, 1]
        if first_sets:
            m[(center == 0).all(dim=1, keepdim=True)] = 0.0
        moved = m * center.float() + (1 - m) * mean            # [S, K]
        center.copy_(torch.where(count > 0, moved, center.float()))


class DINOHead(nn.Module):
    """MLP -> bottleneck -> cosine similarity with unit-norm prototypes (DINO's weight-normed last layer with
    its gain fixed at 1: the same logits)."""

    def __init__(self, dim: int, config: DistillConfig):
        super().__init__()
        c = config
        self.mlp = nn.Sequential(nn.Linear(dim, c.head_hidden), nn.GELU(), nn.Linear(c.head_hidden, c.head_hidden),
                                 nn.GELU(), nn.Linear(c.head_hidden, c.head_bottleneck))
        self.prototypes = nn.Parameter(torch.randn(c.prototypes, c.head_bottleneck) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> [..., K] logits in [-1, 1]."""
        h = F.normalize(self.mlp(x), dim=-1)
        return h @ F.normalize(self.prototypes, dim=-1).T


def sharpen(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """[..., K] -> the teacher's target distribution softmax((logits - center) / temperature)."""
    return F.softmax((teacher_logits - center) / temperature, dim=-1)


def distill_cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Mean over rows of -sum_k p_teacher log softmax(student / T_s); teacher_probs carry no gradient."""
    log_q = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.detach() * log_q).sum(dim=-1).mean()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of the rows of [..., K] distributions."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()


def teacher_verdict(mean_entropy: float, usage: float, prototypes: int) -> str:
    """One line on the teacher's output at the end of a run. Near uniform: mean entropy within 5% of
    ln K, where centring has won over sharpening and the targets carry no signal. Collapsed: at most two
    prototypes win any token. A run in either state has not learned from distillation."""
    top = math.log(prototypes)
    if mean_entropy >= 0.95 * top:
        state = "near uniform, so its targets carry no signal"
    elif usage * prototypes <= 2:
        state = "collapsed onto one or two prototypes"
    else:
        state = "neither uniform nor collapsed"
    return (f"teacher: entropy {mean_entropy:.3f} nats (uniform {top:.3f}), {usage:.0%} of {prototypes} "
            f"prototypes in use: {state}")


class Distiller(nn.Module):
    """The student's heads, the EMA teacher and the centre; MiMModel owns one when `distill.weight > 0`. The
    teacher (encoder + head, plus the decoder and projection when `teacher_features` is "decoder") never
    trains: its parameters are frozen, followed by `update_teacher`."""

    def __init__(self, encoder: nn.Module, decoder: dict[str, nn.Module], decoder_pos_embed: Tensor,
                 config: DistillConfig):
        """decoder: the student's decoder modules by name ("embed", "blocks", "norm"), copied into the teacher
        only when it reads decoder features; decoder_pos_embed [1, N, Dd] is fixed (sincos), so it is a buffer."""
        super().__init__()
        self.config = config
        dim, decoder_dim = encoder.config.dim, decoder_pos_embed.shape[-1]
        self.proj = nn.Linear(decoder_dim, dim)     # decoder features -> the encoder's width the head reads
        self.head = DINOHead(dim, config)
        teacher = {"encoder": copy.deepcopy(encoder), "head": copy.deepcopy(self.head)}
        if config.teacher_features == "decoder":
            teacher |= {f"decoder_{k}": copy.deepcopy(m) for k, m in decoder.items()}
            teacher["proj"] = copy.deepcopy(self.proj)
            self.register_buffer("decoder_pos_embed", decoder_pos_embed.detach().clone())
        self.teacher = nn.ModuleDict(teacher)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, config.prototypes))
        self.center_sums = CentreSums(1, config.prototypes)  # this step's teacher logits, for update_center
        self.temperature = config.teacher_temp_start

    def set_step(self, step: int) -> None:
        self.temperature = self.config.teacher_temperature(step)

    @torch.no_grad()
    def update_teacher(self, encoder: nn.Module, decoder: dict[str, nn.Module], momentum: float) -> None:
        """Each teacher module follows its student module: encoder, head, and (when it has them) the
        decoder modules given as to __init__ and the projection."""
        student = {"encoder": encoder, "head": self.head, "proj": self.proj} | {f"decoder_{k}": m
                                                                                 for k, m in decoder.items()}
        for name, teacher in self.teacher.items():
            ema_update(teacher, student[name], momentum)

    @torch.no_grad()
    def teacher_view(self, x: Tensor) -> Tensor:
        """The teacher's augmented copy of a level's input [B, C, I, I, I] (torch's global RNG, reseeded
        every step: a resumed run draws the same views). MONAI's RandScaleIntensity, RandShiftIntensity
        and RandGaussianNoise do this per sample with their own RNG state in the loader; here the view
        is drawn for the whole batch on the model's device, inside the step, so the same three
        operations are written out."""
        c = self.config
        b = x.shape[0]
        scale = 1 + (torch.rand(b, 1, 1, 1, 1, device=x.device) * 2 - 1) * c.intensity_jitter
        shift = (torch.rand(b, 1, 1, 1, 1, device=x.device) * 2 - 1) * c.intensity_jitter
        return x * scale + shift + torch.randn_like(x) * c.noise

    @torch.no_grad()
    def teacher_tokens(self, x: Tensor) -> Tensor:
        """The features [B, N, D] the teacher's head reads for the whole (augmented) view, every token
        visible: its encoder's tokens, or those through its decoder and projection."""
        t = self.teacher
        tokens = t["encoder"](self.teacher_view(x))                      # [B, N, D]
        if self.config.teacher_features == "decoder":
            h = t["decoder_embed"](tokens) + self.decoder_pos_embed      # [B, N, Dd], no mask tokens
            for blk in t["decoder_blocks"]:
                h = blk(h)
            tokens = t["proj"](t["decoder_norm"](h))                     # [B, N, D]
        return tokens.float()

    def student(self, feats: Tensor) -> Tensor:
        """Student decoder features [..., Dd] -> logits [..., K]."""
        return self.head(self.proj(feats.float()))

    def forward(self, levels, feats: list[Tensor]) -> dict[str, Tensor]:
        """The distillation terms of one hierarchy; feats: the student's decoder features per level
        [B_l, N, Dd]. Returns "distill" (to weight into the loss) and, to log, its two parts, the teacher's
        mean entropy and the share of prototypes that are some token's most likely one."""
        c = self.config
        # one teacher pass over every level's rows (all levels share the encoder input size)
        tokens = list(self.teacher_tokens(torch.cat([lvl.x for lvl in levels])).split(
            [lvl.x.shape[0] for lvl in levels]))                               # [B_l, N, D] each
        with torch.no_grad():
            t_logits = [self.teacher["head"](t) for t in tokens]              # [B_l, N, K] each
        masked = [distill_cross_entropy(sharpen(t[lvl.mask], self.center, self.temperature),
                                        self.student(f[lvl.mask]), c.student_temp)
                  for lvl, f, t in zip(levels, feats, t_logits)]               # masked tokens only
        cross, pooled = [], []
        for i in range(1, len(levels)):
            child = levels[i]
            rows, region = child.parent[:, None], child.parent_tokens        # [B_c, 1], [B_c, c^3]
            with torch.no_grad():
                t_parent = self.teacher["head"](tokens[i - 1][rows, region].mean(1))  # [B_c, K]
                t_child = self.teacher["head"](tokens[i].mean(1))                   # [B_c, K]
            s_child = self.student(feats[i].mean(1))                                # [B_c, K]
            s_parent = self.student(feats[i - 1][rows, region].mean(1))             # [B_c, K]
            cross.append((distill_cross_entropy(sharpen(t_parent, self.center, self.temperature), s_child,
                                                c.student_temp)
                          + distill_cross_entropy(sharpen(t_child, self.center, self.temperature), s_parent,
                                                  c.student_temp)) / 2)
            pooled += [t_parent, t_child]
        loss_masked = torch.stack(masked).mean()
        loss_cross = torch.stack(cross).mean() if cross else loss_masked.new_zeros(())
        with torch.no_grad():
            probs = torch.cat([sharpen(t, self.center, self.temperature).reshape(-1, c.prototypes) for t in t_logits])
            used = torch.zeros(c.prototypes, device=probs.device).index_fill_(0, probs.argmax(-1), 1.0)
            if self.training:  # the centre moves once per optimizer step (update_center), not per forward
                self.center_sums.add(0, torch.cat([t.reshape(-1, c.prototypes) for t in t_logits + pooled]))
        return {"distill": c.masked_weight * loss_masked + c.cross_weight * loss_cross,
                "distill_masked": loss_masked.detach(), "distill_cross": loss_cross.detach(),
                "teacher_entropy": entropy(probs), "prototype_usage": used.mean()}

    @torch.no_grad()
    def update_center(self) -> None:
        """After an optimizer step: center <- m center + (1 - m) mean of the teacher logits of the step's
        micro-batches, over every rank (DINO's centre, zero at step 0)."""
        self.center_sums.apply(self.center, self.config.center_momentum)

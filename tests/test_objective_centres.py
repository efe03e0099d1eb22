"""Issue 32, defect 7: what MiM's objectives see must not depend on the per-GPU batch.

The alignment target's centre and the DINO centre are running means over optimizer steps, all-reduced across
ranks and moved once per step taken (MiMModel.training_step_started / training_step_done). Checked against
hand computations: one crop with two children no longer gets two opposite targets; a step of two
micro-batches moves each centre once, toward the mean over both; a skipped step moves nothing; two gloo ranks
holding [a] and [b] get the centres and the losses of one process holding [a, b].
"""
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.distill import DistillConfig
from models.mim import MiMConfig, MiMModel
from models.mim_masks import Level, MaskConfig, build_hierarchy
from models.vit3d import ViT3DConfig

M = 0.9  # both centres' momentum


def config(levels: int = 2, distill: float = 0.0) -> MiMConfig:
    # The teacher's view without jitter or noise is the input itself: its logits depend on the sample only.
    teacher = DistillConfig(weight=distill, prototypes=8, head_hidden=16, head_bottleneck=8, center_momentum=M,
                            intensity_jitter=0.0, noise=0.0)
    return MiMConfig(encoder=ViT3DConfig(img_size=16, patch_size=4, dim=24, depth=1, heads=2),
                     masks=MaskConfig(levels=levels, mask_ratio=(0.75,), children=2), decoder_dim=16,
                     decoder_depth=1, decoder_heads=2, proj_dim=8, align_center_momentum=M, distill=teacher)


def model_for(cfg: MiMConfig) -> MiMModel:
    torch.manual_seed(0)
    return MiMModel(cfg)


def hierarchy(cfg: MiMConfig, n: int, seed: int) -> list[Level]:
    crops = torch.randn(n, 1, 24, 24, 24, generator=torch.Generator().manual_seed(seed + 100))
    return build_hierarchy(crops, cfg.masks, 4, 16, torch.Generator().manual_seed(seed))


def one_sample(levels: list[Level], r: int, k: int) -> list[Level]:
    """Sample r's own hierarchy out of a batch's: level l holds rows r K^(l-1) .. (r+1) K^(l-1) - 1."""
    out = []
    for depth, lvl in enumerate(levels):
        lo, n = r * k**depth, k**depth
        cut = {f: (v[lo:lo + n] if torch.is_tensor(v) else v) for f, v in lvl.__dict__.items()}
        cut["root"] = cut["root"] - r
        if depth:
            cut["parent"] = cut["parent"] - r * k ** (depth - 1)
        out.append(Level(**cut))
    return out


@torch.no_grad()
def region_means(model: MiMModel, levels: list[Level]) -> list[torch.Tensor]:
    """Per child level, each child's parent decoder features averaged over the tokens it covers [B_c, Dd],
    written out child by child."""
    feats, _ = model.forward_decoder(levels, model.forward_encoder(levels))
    return [torch.stack([feats[i - 1][int(child.parent[r])][child.parent_tokens[r]].mean(0)
                         for r in range(child.x.shape[0])]) for i, child in enumerate(levels) if i]


@torch.no_grad()
def teacher_rows(model: MiMModel, levels: list[Level]) -> torch.Tensor:
    """The rows the DINO centre averages [R, K]: the teacher's logits of every token of every level, and per
    child its parent region's and its own pooled tokens' logits."""
    d = model.distiller
    rows = []
    for i, lvl in enumerate(levels):
        tokens = d.teacher["encoder"](lvl.x)                     # [B_l, N, D]: the teacher's view is the input
        rows.append(d.teacher["head"](tokens).reshape(-1, 8))
        if i:
            parent = d.teacher["encoder"](levels[i - 1].x)       # [B_p, N, D]
            region = torch.stack([parent[int(lvl.parent[r])][lvl.parent_tokens[r]].mean(0)
                                  for r in range(lvl.x.shape[0])])
            rows += [d.teacher["head"](region), d.teacher["head"](tokens.mean(1))]
    return torch.cat(rows)


def optimizer_step(model: MiMModel, step: int, micro: list[list[Level]], taken: bool = True) -> list[dict]:
    """One step as pretrain.train runs it (no weights change here): the hooks around its micro-batches."""
    model.training_step_started(step)
    losses = [model(levels).losses for levels in micro]
    if taken:
        model.training_step_done(step, 100)
    return losses


def test_one_crop_with_two_children_no_longer_gets_opposite_targets():
    cfg = config()
    model = model_for(cfg)
    levels = hierarchy(cfg, 1, 0)                       # 1 crop -> 2 children
    t = model(levels).align_targets[0]                  # [2, Dd]
    assert not torch.allclose(t[0], -t[1], atol=1e-3)   # a batch-mean centre made them exact negatives
    optimizer_step(model, 0, [hierarchy(cfg, 3, 1)])    # another batch sets the centre
    assert model.align_center.abs().sum() > 0
    t = model.eval()(levels).align_targets[0]
    torch.testing.assert_close(t, region_means(model, levels)[0] - model.align_center[0])
    assert F.cosine_similarity(t[0], t[1], dim=0) > -0.99


def test_alignment_centre_moves_once_per_step_toward_the_mean_of_its_micro_batches():
    cfg = config(levels=3)                              # two child levels: one centre row each
    model = model_for(cfg)
    a, b, c, d = (hierarchy(cfg, n, s) for n, s in ((2, 1), (1, 2), (1, 3), (2, 4)))
    means = {k: region_means(model, v) for k, v in dict(a=a, b=b, c=c, d=d).items()}  # weights never change

    def mean_of(*names):  # over the rows of all the micro-batches, not a mean of their means
        return torch.stack([torch.cat([means[n][j] for n in names]).mean(0) for j in range(2)])

    optimizer_step(model, 0, [a, b])                    # grad_accum 2; the first step taken sets the centre
    first = mean_of("a", "b")
    torch.testing.assert_close(model.align_center, first)
    optimizer_step(model, 1, [c, d])
    second = M * first + (1 - M) * mean_of("c", "d")
    torch.testing.assert_close(model.align_center, second)
    twice = M * (M * first + (1 - M) * mean_of("c")) + (1 - M) * mean_of("d")
    assert not torch.allclose(model.align_center, twice, atol=1e-4)
    optimizer_step(model, 2, [a, b], taken=False)       # a skipped (non-finite) step moves nothing ...
    torch.testing.assert_close(model.align_center, second)
    optimizer_step(model, 3, [c])                       # ... and leaves nothing for the next one
    torch.testing.assert_close(model.align_center, M * second + (1 - M) * mean_of("c"))
    model.eval()(a)                                     # an evaluation forward adds nothing either
    optimizer_step(model, 4, [])
    torch.testing.assert_close(model.align_center, M * second + (1 - M) * mean_of("c"))


def test_dino_centre_moves_once_per_step_toward_the_mean_of_its_micro_batches():
    cfg = config(distill=1.0)
    model = model_for(cfg)
    a, b, c = hierarchy(cfg, 2, 1), hierarchy(cfg, 1, 2), hierarchy(cfg, 1, 3)
    rows = {k: teacher_rows(model, v) for k, v in dict(a=a, b=b, c=c).items()}  # the teacher is fixed here
    center = model.distiller.center
    optimizer_step(model, 0, [a, b])                    # grad_accum 2: one update from zero (DINO's start)
    first = (1 - M) * torch.cat([rows["a"], rows["b"]]).mean(0, keepdim=True)
    torch.testing.assert_close(center, first)           # per micro-batch it was M (1 - M) a + (1 - M) b
    optimizer_step(model, 1, [a, b], taken=False)
    torch.testing.assert_close(center, first)
    optimizer_step(model, 2, [c])
    torch.testing.assert_close(center, M * first + (1 - M) * rows["c"].mean(0, keepdim=True))


def _rank(rank: int, init: str, out: str) -> None:
    """One of two gloo ranks: sample `rank` of the batch that test_two_ranks_... holds in one process."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        cfg = config(distill=1.0)
        model = model_for(cfg)
        mine = [one_sample(hierarchy(cfg, 2, seed), rank, 2) for seed in (7, 8)]
        torch.save(run_steps(model, *mine), f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def run_steps(model: MiMModel, first: list[Level], second: list[Level]) -> dict:
    """Step 0 sets the centres; step 1's losses are taken against them, and the centres it leaves."""
    optimizer_step(model, 0, [first])
    (losses,) = optimizer_step(model, 1, [second])
    return {"losses": {k: v.detach() for k, v in losses.items()}, "align_center": model.align_center.clone(),
            "center": model.distiller.center.clone()}


def test_two_ranks_with_one_crop_each_see_what_one_process_with_both_sees(tmp_path):
    # fork: the ranks inherit the imports (spawn re-imports torch and timm, about 5 s of CPU each)
    mp.start_processes(_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    cfg = config(distill=1.0)
    whole = run_steps(model_for(cfg), hierarchy(cfg, 2, 7), hierarchy(cfg, 2, 8))
    for got in ranks:  # the centres of the union batch, on both ranks
        torch.testing.assert_close(got["align_center"], whole["align_center"])
        torch.testing.assert_close(got["center"], whole["center"])
    # DDP averages the ranks' gradients, so the loss it optimises is the mean of theirs: equal rows per rank
    for k in ("align_l2", "distill", "rec_l1", "rec_l2", "loss"):
        torch.testing.assert_close((ranks[0]["losses"][k] + ranks[1]["losses"][k]) / 2, whole["losses"][k],
                                   msg=lambda m, k=k: f"{k}: {m}")

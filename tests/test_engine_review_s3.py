"""Issue 32 review, engine: resuming checks the weights' shapes as well as their names, names the changed model
flag when that is the cause, and refuses before the run's config.yaml is touched; the non-finite guard counts in
one unit, skipped optimizer steps, whatever grad_accum is."""
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from core.errors import InputError
from engine.checkpoints import Checkpointer
from engine.steps import NonFiniteGuard, TrainingStopped, optimizer_step

ROOT = Path(__file__).resolve().parents[1]


# --- 1. the key check before resuming ----------------------------------------------------------------------------

class Centred(torch.nn.Module):
    """A model whose buffer's shape follows a flag, as MiMModel's align_center [L-1, Dd] follows masks.levels."""

    def __init__(self, levels: int):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("align_center", torch.zeros(levels - 1, 2))  # [L-1, Dd]


def _saved(tmp_path: Path, levels: int, model_flags: dict) -> Path:
    """A checkpoint of a Centred(levels) run whose run_config.json holds `model_flags` as its model section."""
    acc = Accelerator(cpu=True)
    model = Centred(levels)
    model, _ = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return Checkpointer(tmp_path, keep=1).save(acc, model, step=1, state={},
                                               files={"run_config.json": {"seed": 0, "model": model_flags}})


def _load_into(levels: int, path: Path, model_flags: dict) -> str:
    """The one line a resume of `path` into a Centred(levels) model gives (an InputError)."""
    acc = Accelerator(cpu=True)
    model = Centred(levels)
    model, _ = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(InputError) as e:
        Checkpointer(path.parents[1], keep=1).load(acc, path, model_config=model_flags)
    assert torch.equal(acc.unwrap_model(model).align_center, torch.zeros(levels - 1, 2))  # nothing filled in
    return str(e.value)


def test_a_buffer_of_another_shape_is_refused_naming_the_changed_flag(tmp_path):
    path = _saved(tmp_path, 2, {"masks": {"levels": 2, "children": 2}, "decoder_dim": 2})
    said = _load_into(3, path, {"masks": {"levels": 3, "children": 2}, "decoder_dim": 2})
    assert "\n" not in said and str(path) in said
    assert "align_center [1, 2] -> [2, 2]" in said  # the checkpoint's shape, then this model's
    assert "--model.masks.levels 2 -> 3" in said and "children" not in said and "decoder_dim" not in said
    assert "older mimfm" not in said


def test_the_same_flags_with_other_weights_blame_an_older_mimfm(tmp_path):
    flags = {"masks": {"levels": 2}}
    path = _saved(tmp_path, 2, flags)
    said = _load_into(3, path, flags)
    assert "\n" not in said and "align_center [1, 2] -> [2, 2]" in said and "older mimfm" in said


def test_resuming_a_pretraining_run_with_more_levels_is_one_line_and_leaves_its_config(synth_cohort, tmp_path):
    """The real run: 2 levels for 1 step, then --resume auto with 3 (align_center [1, Dd] -> [2, Dd], the same
    keys): before, accelerate's 2-line size-mismatch RuntimeError, after config.yaml was already rewritten."""
    from core.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.train import train

    def cfg(levels: int, **over) -> PretrainConfig:
        c = load_config(PretrainConfig, ROOT / "launch" / "pretrain_tiny_cpu.yaml")
        c.data, c.cache_dir, c.output_dir = str(synth_cohort / "unlabeled"), str(tmp_path / "cache"), str(tmp_path / "r")
        c.mixed_precision, c.log_every, c.preview_every, c.report_to = "no", 1, 0, "none"
        c.crop_size, c.crops_per_volume, c.batch_size = 64, 1, 1
        c.model.encoder.dim, c.model.encoder.depth, c.model.decoder_dim, c.model.proj_dim = 24, 1, 24, 8
        c.model.encoder.heads, c.model.decoder_heads = 2, 2
        c.model.masks.levels, c.model.masks.mask_ratio = levels, (0.75,)
        for k, v in over.items():
            setattr(c, k, v)
        return c

    train(cfg(2, max_steps=1, ckpt_every=1))
    config = tmp_path / "r" / "config.yaml"
    before = config.read_bytes()
    with pytest.raises(InputError) as e:
        train(cfg(3, max_steps=2, ckpt_every=1, resume="auto"))
    said = str(e.value)
    assert "\n" not in said and "--model.masks.levels 2 -> 3" in said and "align_center" in said
    assert config.read_bytes() == before


# --- 2. the guard counts skipped optimizer steps -----------------------------------------------------------------

def _accumulating(grad_accum: int):
    acc = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    torch.manual_seed(0)
    model = acc.prepare(torch.nn.Linear(3, 1))
    return acc, model, acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))


def _step(acc, model, opt, guard, scales: list[float]) -> bool:
    """One optimizer step over len(scales) micro-batches, each loss scaled (a NaN scale: a non-finite loss)."""
    x = torch.ones(2, 3)
    _, step_ok, _ = optimizer_step(acc, model, opt, guard, 1.0, scales, lambda s: {"loss": model(x).sum() * s})
    return step_ok


def test_grad_accum_4_with_every_loss_nan_stops_after_exactly_max_nonfinite_steps():
    acc, model, opt = _accumulating(4)
    guard, nan = NonFiniteGuard(max_in_row=5), float("nan")
    for k in range(1, 5):  # 4 skipped steps (16 non-finite micro-batches): counted 1 each, the run goes on
        assert not _step(acc, model, opt, guard, [nan] * 4) and (guard.in_row, guard.total) == (k, k)
    with pytest.raises(TrainingStopped, match=r"^5 consecutive skipped optimizer steps .*5 skipped in total"):
        _step(acc, model, opt, guard, [nan] * 4)


def test_a_step_of_a_nan_then_a_finite_micro_batch_counts_one_in_a_row():
    acc, model, opt = _accumulating(2)
    guard, nan = NonFiniteGuard(max_in_row=3), float("nan")
    w0 = model.weight.detach().clone()
    assert not _step(acc, model, opt, guard, [nan, 1.0]) and (guard.in_row, guard.total) == (1, 1)
    assert not _step(acc, model, opt, guard, [nan, 1.0]) and (guard.in_row, guard.total) == (2, 2)
    assert torch.equal(model.weight, w0)  # neither spoiled step was applied
    assert _step(acc, model, opt, guard, [1.0, 1.0]) and (guard.in_row, guard.total) == (0, 2)  # applied: reset
    assert not _step(acc, model, opt, guard, [1.0, nan]) and (guard.in_row, guard.total) == (1, 3)


def test_a_guard_state_from_an_older_checkpoint_loads():
    guard = NonFiniteGuard(max_in_row=5)
    guard.load_state_dict({"in_row": 2, "total": 7, "holding": True})  # what older checkpoints hold
    assert (guard.in_row, guard.total) == (2, 7) and set(guard.state_dict()) >= {"in_row", "total"}
    guard.load_state_dict({})  # older still: no guard state at all
    assert (guard.in_row, guard.total) == (0, 0)

"""Shared loop plumbing: schedule values, non-finite guard, resumable batch order, checkpoints."""
import math

import pytest
import torch
from torch.utils.data import Dataset

from engine.batches import ResumableBatches
from engine.checkpoints import Checkpointer
from engine.config import LoopConfig, OptimConfig
from engine.distributed import make_accelerator
from engine.steps import NonFiniteGuard, TrainingStopped, WarmupCosine, step_seed


def test_warmup_cosine_values_and_lr_scale():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr_scale": 0.5}])
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=4)
    s = WarmupCosine(opt, cfg, max_steps=14)
    assert [s.lr_at(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr_at(4) == pytest.approx(1.0)
    assert s.lr_at(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(14) == pytest.approx(0.0)
    s.set_step(1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)  # 0.5 * lr_scale 0.5


def test_nonfinite_guard_counts_and_stops():
    """ok() only reports a micro-batch; step_verdict counts once per skipped optimizer step, and only an
    applied step resets the run of skips."""
    acc = make_accelerator(LoopConfig(mixed_precision="no"))
    g = NonFiniteGuard(max_in_row=3)
    assert g.ok(torch.tensor(1.0), acc)
    assert not g.ok(torch.tensor(float("nan")), acc) and not g.ok(torch.tensor(float("inf")), acc)
    assert (g.in_row, g.total) == (0, 0)  # ok() only reports
    assert not g.step_verdict(True, acc) and not g.step_verdict(True, acc) and g.step_verdict(False, acc)
    assert (g.in_row, g.total) == (0, 2)
    g.step_verdict(True, acc), g.step_verdict(True, acc)
    with pytest.raises(TrainingStopped, match="3 consecutive skipped optimizer steps"):
        g.step_verdict(True, acc)


class Numbers(Dataset):
    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, self.epoch])


def test_resumable_batches_continue_exactly_mid_epoch():
    def take(start, k):
        it = ResumableBatches(Numbers(10), 3, seed=1, num_replicas=1, rank=0).iterate(start)
        return [next(it) for _ in range(k)]
    full = take(0, 8)                   # 3 batches per epoch (drop_last) -> crosses 2 epoch boundaries
    resumed = take(5, 3)
    for (m1, b1), (m2, b2) in zip(full[5:], resumed):
        assert m1 == m2 and torch.equal(b1, b2)
    assert full[0][1][0, 1] == 0 and full[3][1][0, 1] == 1  # the dataset saw the epoch


@pytest.mark.parametrize("workers", [0, 1])
def test_one_loader_across_epochs_gives_the_same_batches_as_one_per_epoch(workers, monkeypatch):
    def take(start, k, span):
        monkeypatch.setattr(ResumableBatches, "LOADER_SPAN", span)
        it = ResumableBatches(Numbers(10), 3, seed=1, num_replicas=1, rank=0, num_workers=workers).iterate(start)
        return [next(it) for _ in range(k)]
    per_epoch, spanning = take(0, 10, span=1), take(0, 10, span=512)  # 1 epoch vs all 4 epochs per loader
    assert [m for m, _ in per_epoch] == [m for m, _ in spanning] == list(range(10))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(per_epoch, spanning))
    assert [int(b[0, 1]) for _, b in spanning] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # each item saw its epoch
    resumed = take(4, 6, span=512)  # mid-epoch, inside a spanning loader
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(per_epoch[4:], resumed))


def test_resumable_batches_split_ranks_disjointly():
    seen = []
    for rank in range(2):
        it = ResumableBatches(Numbers(8), 2, seed=0, num_replicas=2, rank=rank).iterate(0)
        seen += [int(v) for _ in range(2) for v in next(it)[1][:, 0]]
    assert sorted(seen) == list(range(8))


def test_checkpointer_rotation_and_latest(tmp_path):
    acc = make_accelerator(LoopConfig(mixed_precision="no"))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(acc, model, step, {"x": step}, {"extra.json": {"step": step}})
    names = [p.name for p in ck.complete()]
    assert names == ["ckpt-0000002", "ckpt-0000003"]
    (tmp_path / "checkpoints" / "ckpt-0000009").mkdir()  # incomplete: no trainer_state.json
    assert ck.resolve("auto").name == "ckpt-0000003"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    with torch.no_grad():
        model.weight.zero_()
    state = ck.load(acc, ck.latest())
    assert state["step"] == 3 and state["x"] == 3 and model.weight.abs().sum() > 0


def test_step_seed_distinct_and_stable():
    assert step_seed(0, 1) == step_seed(0, 1)
    assert len({step_seed(0, s, r) for s in range(50) for r in range(2)}) == 100


def test_backward_and_step_skips_a_step_spoiled_by_one_nonfinite_micro_batch():
    from accelerate import Accelerator

    from engine.steps import NonFiniteGuard, backward_and_step
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = acc.prepare(torch.nn.Linear(3, 1))
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    guard, x = NonFiniteGuard(5), torch.ones(2, 3)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()

    def optimizer_step(scales):
        step_ok, finite = True, []
        for scale in scales:
            with acc.accumulate(model):
                f, step_ok = backward_and_step(acc, model, opt, model(x).sum() * scale, guard, 1.0, step_ok)
                finite.append(f)
        return finite, step_ok

    assert optimizer_step([float("nan"), 1.0]) == ([False, True], False)
    assert torch.equal(model.weight, w0) and torch.equal(model.bias, b0) and guard.total == 1
    assert model.weight.grad is None  # zeroed on the boundary: nothing leaks into the next step
    assert optimizer_step([1.0, 1.0]) == ([True, True], True)
    # Mean gradient over the 2 micro-batches: 2 for each weight and for the bias, norm 4, clipped to 1.
    torch.testing.assert_close(model.weight, w0 - 0.1 * 0.5)
    torch.testing.assert_close(model.bias, b0 - 0.1 * 0.5)

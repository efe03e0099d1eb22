"""Engine and fine-tuning robustness (issues 32, 33 review): DeepSpeed's own skipped steps count in the
non-finite guard, a pretraining checkpoint that lacks a buffer of today's model is refused in one line on
resume, and held-out patients clash with training patients by (site, patient_id) where both tables name sites."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from core.errors import InputError
from data.manifest import read_manifest
from engine.checkpoints import Checkpointer
from engine.steps import NonFiniteGuard, TrainingStopped, backward_and_step
from finetune.train import refuse_training_patients


RUN = "{} consecutive skipped optimizer steps"  # the guard's stop line


# --- 1. DeepSpeed's own skipped steps --------------------------------------------------------------------------

class FakeDeepSpeedOptimizer:
    """What backward_and_step reads of DeepSpeed's optimizer wrapper: its verdict on the step it just ran."""

    def __init__(self):
        self.step_was_skipped = False


def fake_deepspeed_accelerator() -> SimpleNamespace:
    """One rank under DeepSpeed with grad_accum 1: every micro-batch is a boundary, and backward is the engine's
    (which steps inside; here a plain backward, as the step itself is DeepSpeed's and only its verdict matters)."""
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1, sync_gradients=True,
                           device="cpu", backward=lambda loss: loss.backward())


def ds_step(acc, optimizer, guard, loss_scale: float, skipped: bool) -> bool:
    w = torch.ones(3, requires_grad=True)
    optimizer.step_was_skipped = skipped
    _, step_ok = backward_and_step(acc, None, optimizer, w.sum() * loss_scale, guard, clip_grad=0.0)
    return step_ok


def test_deepspeed_skipped_steps_with_finite_losses_count_and_stop_the_run():
    acc, opt, guard = fake_deepspeed_accelerator(), FakeDeepSpeedOptimizer(), NonFiniteGuard(max_in_row=3)
    assert ds_step(acc, opt, guard, 1.0, skipped=False) and (guard.total, guard.in_row) == (0, 0)
    # finite losses, but ZeRO's overflow check found non-finite gradients and skipped the update
    assert not ds_step(acc, opt, guard, 1.0, skipped=True) and (guard.total, guard.in_row) == (1, 1)
    assert not ds_step(acc, opt, guard, 1.0, skipped=True) and (guard.total, guard.in_row) == (2, 2)
    assert ds_step(acc, opt, guard, 1.0, skipped=False) and (guard.total, guard.in_row) == (2, 0)  # applied: reset
    ds_step(acc, opt, guard, 1.0, skipped=True), ds_step(acc, opt, guard, 1.0, skipped=True)
    with pytest.raises(TrainingStopped, match=RUN.format(3) + r" .*5 skipped in total"):
        ds_step(acc, opt, guard, 1.0, skipped=True)


def test_a_step_spoiled_by_a_nonfinite_loss_counts_once_and_keeps_a_deepspeed_streak():
    acc, opt, guard = fake_deepspeed_accelerator(), FakeDeepSpeedOptimizer(), NonFiniteGuard(max_in_row=3)
    assert not ds_step(acc, opt, guard, float("nan"), skipped=True)  # DeepSpeed skips what the NaN spoiled
    assert (guard.total, guard.in_row) == (1, 1)  # the NaN loss, not counted twice
    assert not ds_step(acc, opt, guard, 1.0, skipped=True) and (guard.total, guard.in_row) == (2, 2)
    with pytest.raises(TrainingStopped, match=RUN.format(3)):
        ds_step(acc, opt, guard, 1.0, skipped=True)  # no update since the NaN: a finite loss does not reset it


def test_guard_state_round_trips_a_deepspeed_streak():
    acc, opt, guard = fake_deepspeed_accelerator(), FakeDeepSpeedOptimizer(), NonFiniteGuard(max_in_row=2)
    ds_step(acc, opt, guard, 1.0, skipped=True)
    resumed = NonFiniteGuard(max_in_row=2)
    resumed.load_state_dict(guard.state_dict())
    with pytest.raises(TrainingStopped, match=RUN.format(2)):
        ds_step(acc, opt, resumed, 1.0, skipped=True)


@pytest.mark.parametrize("clip_grad", [1.0, 0.0])
def test_without_deepspeed_a_finite_loss_with_nonfinite_gradients_skips_the_step_and_counts(clip_grad):
    """The same skip without DeepSpeed: the step is not applied (the weights stay finite), and it counts."""
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = acc.prepare(torch.nn.Linear(3, 1))
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    guard, x = NonFiniteGuard(max_in_row=3), torch.ones(2, 3)
    w0 = model.weight.detach().clone()

    def step(broken: bool) -> tuple[bool, bool]:
        with acc.accumulate(model):
            y = model(x)  # [2, 1]
            # sqrt(0 * y) is 0, a finite loss, but its gradient is inf * 0 = NaN: what an op at a singular point gives
            loss = torch.sqrt(y * 0).sum() if broken else y.sum()
            return backward_and_step(acc, model, opt, loss, guard, clip_grad)

    assert step(broken=True) == (True, False) and torch.equal(model.weight, w0) and model.weight.grad is None
    assert (guard.total, guard.in_row) == (1, 1)
    assert step(broken=True) == (True, False) and (guard.total, guard.in_row) == (2, 2)  # a finite loss: still a run
    assert step(broken=False) == (True, True) and (guard.total, guard.in_row) == (2, 0)
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight, w0)
    step(broken=True), step(broken=True)
    with pytest.raises(TrainingStopped, match=RUN.format(3) + r" .*5 skipped in total"):
        step(broken=True)


# --- 2. a checkpoint written before a buffer existed ------------------------------------------------------------

class WithCentre(torch.nn.Module):
    """A model with a buffer registered beside its weights, as MiMModel's align_center (levels > 1)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("align_center", torch.zeros(2, 2))  # [L-1, Dd]


def _drop_from_checkpoint(folder: Path, key: str) -> None:
    """Rewrite the checkpoint's weights as a writer that never had `key` would have written them."""
    for name in ("model.safetensors", "weights.safetensors"):
        tensors = load_file(str(folder / name))
        save_file({k: v for k, v in tensors.items() if k != key}, str(folder / name))


def _saved_checkpoint(folder, step: int):
    """(accelerator, prepared WithCentre, Checkpointer, the checkpoint it wrote at `step`)."""
    acc = Accelerator(cpu=True)
    model = WithCentre()
    model, _ = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ckpt = Checkpointer(folder, keep=1)
    return acc, model, ckpt, ckpt.save(acc, model, step=step, state={}, files={})


def test_resuming_a_checkpoint_without_a_buffer_is_one_line_naming_folder_and_keys(tmp_path):
    acc, model, ckpt, path = _saved_checkpoint(tmp_path, step=2)
    assert ckpt.load(acc, path)["step"] == 2  # as written, it loads
    _drop_from_checkpoint(path, "align_center")
    with pytest.raises(InputError) as e:
        ckpt.load(acc, path)
    said = str(e.value)
    assert "\n" not in said and str(path) in said and "missing align_center" in said
    assert "older mimfm" in said and "new run" in said
    # nothing was filled in silently
    assert torch.equal(acc.unwrap_model(model).align_center, torch.zeros(2, 2))


def test_resuming_a_checkpoint_with_a_key_the_model_lacks_names_it(tmp_path):
    acc, model, ckpt, path = _saved_checkpoint(tmp_path, step=1)
    for name in ("model.safetensors", "weights.safetensors"):
        save_file({**load_file(str(path / name)), "old_head.weight": torch.ones(1)}, str(path / name))
    with pytest.raises(InputError, match=r"unexpected old_head\.weight") as e:
        ckpt.load(acc, path)
    assert "\n" not in str(e.value)


# --- 4. a patient_id clash, by site ---------------------------------------------------------------------------

def _manifest(folder: Path, name: str, rows: list[tuple], site: bool = True):
    """A manifest as data.manifest reads it (its own defaults: patient_id, site); files are not checked."""
    header = "subject_id,patient_id,site,image,mask" if site else "subject_id,patient_id,image,mask"
    lines = [",".join(map(str, r if site else (r[0], r[1])) ) + ",i.nii.gz,m.nii.gz" for r in rows]
    path = folder / name
    path.write_text("\n".join([header, *lines]) + "\n")
    return read_manifest(path, check_files=False)


def test_the_same_patient_id_at_another_site_is_another_patient(tmp_path):
    train = _manifest(tmp_path, "train.csv", [("s1", "P001", "A"), ("s2", "P002", "A")])
    held = _manifest(tmp_path, "ext.csv", [("e1", "P001", "B")])
    refuse_training_patients(held, "ext.csv", train, "train.csv")  # accepted


def test_the_same_patient_id_at_the_same_site_is_refused_naming_the_site(tmp_path):
    train = _manifest(tmp_path, "train.csv", [("s1", "P001", "A"), ("s2", "P001", "B")])
    held = _manifest(tmp_path, "ext.csv", [("e1", "P001", "B"), ("e2", "P003", "A")])
    with pytest.raises(InputError) as e:
        refuse_training_patients(held, "ext.csv", train, "train.csv")
    said = str(e.value)
    assert "P001 at site B (subject e1 here, s2 there)" in said and "P003" not in said and "(site, patient_id)" in said


def test_a_table_without_sites_compares_patient_id_alone(tmp_path):
    # the external table names no site (read as the default for every row): its P001 may be either site's
    train = _manifest(tmp_path, "train.csv", [("s1", "P001", "A")])
    held = _manifest(tmp_path, "ext.csv", [("e1", "P001", None)], site=False)
    with pytest.raises(InputError, match="patient_id P001 .subject e1 here, s1 there."):
        refuse_training_patients(held, "ext.csv", train, "train.csv")

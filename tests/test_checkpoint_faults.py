"""Fault test (issue 32): the disk fills while a checkpoint is written. The run stops with one line, the
last complete checkpoint stays loadable and newest, nothing half-written counts as complete, and
--resume auto finishes the run once there is space again."""
import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import engine.checkpoints as checkpoints
from engine.checkpoints import Checkpointer
from pretrain.train import main

ROOT = Path(__file__).resolve().parents[1]


def _argv(cohort, out, *extra):
    return ["--config", str(ROOT / "launch" / "pretrain_tiny_cpu.yaml"), "--data", str(cohort / "unlabeled"),
            "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"), "--mixed_precision", "no",
            "--crop_size", "64", "--crops_per_volume", "1", "--batch_size", "2", "--preview_every", "0",
            "--log_every", "1", "--max_steps", "4", "--ckpt_every", "2", "--lesion_view_fraction", "0", *extra]


def _disk_full_at(step_to_fail: int, real_save_file):
    """save_file that writes half the weights file of `step_to_fail`'s checkpoint, then finds the disk full."""
    def save_file(tensors, filename, *a, **k):
        if f"ckpt-{step_to_fail:07d}" in str(filename):
            real_save_file(tensors, filename, *a, **k)
            size = Path(filename).stat().st_size
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
            # what safetensors really raises on a full disk: its own error, not an OSError
            raise SafetensorError("I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *a, **k)
    return save_file


def test_a_full_disk_while_checkpointing_stops_cleanly_and_resume_finishes(synth_cohort, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "full"
    monkeypatch.setattr(checkpoints, "save_file", _disk_full_at(4, checkpoints.save_file))
    with pytest.raises(SystemExit) as code:
        main(_argv(synth_cohort, out))
    assert code.value.code == 1  # a stopped run (core.errors.RunStopped), not a crash
    err = capsys.readouterr().err  # progress bars, then the one line
    said = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(said) == 1 and said[0].startswith("error: ") and "Traceback" not in err, err
    assert "No space left on device" in said[0] and "ckpt-0000002" in said[0] and "--resume auto" in said[0]
    # only the complete checkpoint is left: no half-written folder, and it is what resume finds
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-0000002"]
    ckpt = Checkpointer(out, keep=2)
    assert ckpt.latest() == out / "checkpoints" / "ckpt-0000002"
    weights = load_file(str(ckpt.latest() / "weights.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / "encoder").exists()

    monkeypatch.undo()  # space is free again
    capsys.readouterr()
    main(_argv(synth_cohort, out, "--resume", "auto"))
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "ckpt-0000002" in printed and "4 steps" in printed
    state = json.loads((out / "checkpoints" / "ckpt-0000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and (out / "encoder" / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the stopped run's rows after its checkpoint are dropped


def test_a_half_written_checkpoint_is_never_taken_as_complete(tmp_path):
    """A run killed inside save leaves .tmp-ckpt-* (maybe with every file but trainer_state.json) or a
    ckpt folder without trainer_state.json: neither is a checkpoint to resume."""
    root = tmp_path / "checkpoints"
    (root / "ckpt-0000002").mkdir(parents=True)
    (root / "ckpt-0000002" / "trainer_state.json").write_text('{"step": 2}')
    (root / ".tmp-ckpt-0000004").mkdir()
    (root / ".tmp-ckpt-0000004" / "trainer_state.json").write_text('{"step": 4}')
    (root / "ckpt-0000006").mkdir()  # renamed is impossible without trainer_state.json; still refused
    ckpt = Checkpointer(tmp_path, keep=2)
    assert ckpt.complete() == [root / "ckpt-0000002"] and ckpt.resolve("auto") == root / "ckpt-0000002"


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    """metrics.jsonl cannot take another row: RunStopped naming the file (the CLI prints it as one line)."""
    import builtins

    from accelerate import Accelerator

    from core.errors import RunStopped
    from engine.logs import RunLogger
    logger = RunLogger(Accelerator(cpu=True), tmp_path)
    logger.log(1, {"loss": 1.0})
    real_open = builtins.open

    def full(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(RunStopped, match=r"metrics.jsonl: could not append step 2's row \(No space left"):
        logger.log(2, {"loss": 0.5})


@pytest.mark.parametrize("error", [OSError(errno.EDQUOT, "Disk quota exceeded"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")])
def test_every_kind_of_failed_write_is_returned_for_the_ranks_to_agree_on(error):
    """torch.save (accelerate's save_state) raises a RuntimeError on a full disk, not an OSError."""
    def write():
        raise error
    assert checkpoints._attempt(write) is error

"""A run never takes another run's output for its own (issue 32, defect 1): a fresh pretraining run in a
used output folder is refused before it writes anything, the encoder exported is the checkpoint this run
wrote, and metrics.jsonl holds one run's rows."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import InputError
from pretrain.train import main, train
from tests.test_pretrain_loop import tiny_cfg


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def used_run(synth_cohort, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("folders") / "run"
    train(tiny_cfg(synth_cohort, out, max_steps=4, ckpt_every=2))
    return out


def test_a_fresh_run_in_a_used_folder_is_refused_before_writing(used_run, synth_cohort, capsys):
    before = {p: p.read_bytes() for p in used_run.rglob("*") if p.is_file()}
    with pytest.raises(InputError) as e:
        train(tiny_cfg(synth_cohort, used_run, max_steps=2, seed=5))
    msg = str(e.value)
    assert str(used_run / "checkpoints") in msg and "--resume auto" in msg and "--output_dir" in msg
    assert "\n" not in msg
    after = {p: p.read_bytes() for p in used_run.rglob("*") if p.is_file()}
    assert after == before  # config, log, checkpoints and the exported encoder are untouched
    # the CLI says it in one line and exits with 2
    argv = ["--config", str(Path(__file__).resolve().parents[1] / "launch" / "pretrain_tiny_cpu.yaml"),
            "--data", str(synth_cohort / "unlabeled"), "--output_dir", str(used_run),
            "--cache_dir", str(used_run.parent / "cache"), "--max_steps", "2"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resume auto" in err


def test_the_export_is_the_checkpoint_this_run_wrote(used_run, synth_cohort, tmp_path, capsys):
    """Resumed from step 2 with max_steps 3: the run writes ckpt-3, while the older ckpt-4 is the
    highest step in the folder. The exported encoder must be step 3's weights."""
    import shutil
    out = tmp_path / "branch"
    shutil.copytree(used_run, out)
    capsys.readouterr()
    train(tiny_cfg(synth_cohort, out, max_steps=3, resume=str(out / "checkpoints" / "ckpt-0000002")))
    printed = capsys.readouterr().out
    assert "3 steps" in printed and "ckpt-0000004" not in printed
    from models.vit3d import ViT3D
    enc = ViT3D.from_pretrained(out / "encoder")
    own = load_file(str(out / "checkpoints" / "ckpt-0000003" / "weights.safetensors"))
    other = load_file(str(out / "checkpoints" / "ckpt-0000004" / "weights.safetensors"))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, own["encoder." + k]), k
    assert any(not torch.equal(own[k], other[k]) for k in own if k.startswith("encoder."))
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]  # the log follows this run's timeline


def test_a_run_that_starts_at_step_zero_starts_a_new_log(synth_cohort, tmp_path):
    """--resume auto with no checkpoint yet (the last run died before its first) starts at step 0:
    the dead run's rows must not stay in front of this run's."""
    out = tmp_path / "crashed"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 99.0}) + "\n"
                                       + json.dumps({"step": 2, "train/loss": 98.0}) + "\n" + '{"step": 3, "tr')
    train(tiny_cfg(synth_cohort, out, max_steps=2, resume="auto"))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/loss"] < 90 for r in rows)


def test_fine_tuning_refuses_another_runs_folds_unless_told_to_retrain(tmp_path):
    """finetune.train.refuse_other_runs_folds: saved folds of another fingerprint (or unreadable) are another
    run's; this run's own folds (a crashed or extended run) continue; --reuse_folds false retrains over them."""
    from finetune.config import FinetuneConfig
    from finetune.train import refuse_other_runs_folds
    folds = tmp_path / "folds"
    folds.mkdir()
    (folds / "fold0.json").write_text(json.dumps({"fold": 0, "fingerprint": "mine", "rows": "r0"}))
    cfg = FinetuneConfig(output_dir=str(tmp_path))
    stamps = ["r0", "r1", "r2"]
    refuse_other_runs_folds(cfg, "mine", stamps)  # this run's own folds: reused, not refused
    (folds / "fold1.json").write_text(json.dumps({"fold": 1, "fingerprint": "theirs"}))
    (folds / "fold2.json").write_text("{torn")
    with pytest.raises(InputError, match=r"fold1, fold2 are another run's.*--reuse_folds false"):
        refuse_other_runs_folds(cfg, "mine", stamps)
    (folds / "fold1.json").write_text(json.dumps({"fold": 1, "fingerprint": "mine"}))  # saved before row stamps
    (folds / "fold2.json").write_text(json.dumps({"fold": 2, "fingerprint": "mine", "rows": "edited"}))
    with pytest.raises(InputError, match=r"fold2 were trained on other rows of .* under the same subject ids"):
        refuse_other_runs_folds(cfg, "mine", stamps)
    cfg.reuse_folds = False
    refuse_other_runs_folds(cfg, "mine", stamps)  # told: every fold is trained again


def test_a_fold_trained_before_the_manifest_was_edited_is_not_reused(synth_cohort, tmp_path):
    """The same subject ids, one training label corrected (or a clinical value, or a clinical column added): the
    finished folds were trained on what the manifest no longer says. Before, the fold fingerprint held the ids
    only and the rerun reused them without a word; now it is refused before any work, and an unchanged manifest
    still reuses them."""
    import pandas as pd
    from finetune.train import run
    from test_finetune_loop import tiny_cfg
    manifest = synth_cohort / "manifest_edited.csv"  # beside the cohort's: its relative image paths hold
    df = pd.read_csv(synth_cohort / "manifest.csv", dtype={"subject_id": str})
    df.to_csv(manifest, index=False)
    cfg = tiny_cfg(synth_cohort, tmp_path / "run", task="classification", epochs=1, explain=0, figures=False,
                   n_boot=0, manifest=str(manifest), external="")
    run(cfg)
    folds = sorted((tmp_path / "run" / "folds").glob("fold*.json"))
    written = {p.name: p.stat().st_mtime_ns for p in folds}
    assert len(folds) == 2 and all(json.loads(p.read_text())["rows"] for p in folds)
    run(cfg)  # unchanged: every fold reused, none retrained (a retrained fold rewrites its json)
    assert {p.name: p.stat().st_mtime_ns for p in folds} == written
    train_id = json.loads((tmp_path / "run" / "splits.json").read_text())["folds"][0]["train"][0]
    df.loc[df["subject_id"] == train_id, "label"] = 1 - df.loc[df["subject_id"] == train_id, "label"]
    df.to_csv(manifest, index=False)
    with pytest.raises(InputError, match=r"fold0, fold1 were trained on other rows of .*manifest_edited.csv"):
        run(cfg)
    df.loc[df["subject_id"] == train_id, "label"] = 1 - df.loc[df["subject_id"] == train_id, "label"]
    df.assign(bmi=range(len(df))).to_csv(manifest, index=False)  # a clinical column added
    with pytest.raises(InputError, match=r"were trained on other rows"):
        run(cfg)

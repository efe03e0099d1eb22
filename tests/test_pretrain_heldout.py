"""benchmarks.research.pretrain_heldout: the MiM losses of every checkpoint on trained-on vs never-seen volumes."""
import json
from pathlib import Path

import pytest

from benchmarks.research import pretrain_heldout
from core.config import load_config
from pretrain.config import PretrainConfig
from pretrain.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_and_heldout(synth_cohort, tmp_path_factory):
    """A 40-step run of the CPU recipe's views (lesion candidates, two levels) on the cohort's 4 unlabelled
    volumes, checkpointed at 20 and 40, and 2 volumes of another seed that it never saw."""
    from data.synth import generate_cohort
    tmp = tmp_path_factory.mktemp("heldout")
    cfg = load_config(PretrainConfig, ROOT / "launch" / "pretrain_cpu.yaml")
    cfg.data, cfg.cache_dir, cfg.output_dir = str(synth_cohort / "unlabeled"), str(tmp / "cache"), str(tmp / "run")
    cfg.mixed_precision, cfg.preview_every, cfg.num_workers = "no", 0, 0
    cfg.batch_size, cfg.crops_per_volume = 2, 2
    cfg.max_steps, cfg.ckpt_every, cfg.keep_ckpts, cfg.optim.warmup_steps = 40, 20, 2, 5
    train(cfg)
    held = generate_cohort(tmp / "other", n_unlabeled=2, n_labeled=0, n_external=0, seed=7, progress=False)
    return tmp / "run", held / "unlabeled", tmp


def _run(run, heldout, out, *extra):
    rc = pretrain_heldout.main(["--run", str(run), "--heldout", str(heldout), "--out", str(out), "--train_volumes",
                                "4", "--heldout_volumes", "2", "--no_progress", *extra])
    assert rc == 0
    return json.loads((out / "heldout.json").read_text())


def reconstruction(row, name):
    return sum(v["mean"] for k, v in row[name].items() if k.startswith("rec_l"))


def test_scores_every_checkpoint_deterministically_and_the_loss_falls_on_unseen_volumes(run_and_heldout):
    run, heldout, tmp = run_and_heldout
    res = _run(run, heldout, tmp / "a", "--epochs", "2")
    assert [r["step"] for r in res["rows"]] == [0, 20, 40]
    assert res["volumes"] == {"train": 4, "heldout": 2} and res["micro_batches"] == {"train": 4, "heldout": 2}
    assert set(res["rows"][0]["train"]) == {"loss", "rec_l1", "rec_l2", "align_l2"}
    # the objective learnt in 40 steps carries to volumes the run never saw: held-out reconstruction falls
    first, last = res["rows"][0], res["rows"][-1]
    assert reconstruction(last, "heldout") < 0.97 * reconstruction(first, "heldout"), (first, last)
    assert reconstruction(last, "train") < 0.97 * reconstruction(first, "train")
    # the loss is the level-weighted sum of its terms (weights 1; alignment weight 0.1), as the loop computes it
    r = last["train"]
    assert r["loss"]["mean"] == pytest.approx(r["rec_l1"]["mean"] + r["rec_l2"]["mean"] + 0.1 * r["align_l2"]["mean"],
                                              rel=1e-5)
    for f in ("heldout.json", "heldout.md", "heldout.png"):
        assert (tmp / "a" / f).stat().st_size > 0
    again = _run(run, heldout, tmp / "b", "--epochs", "2")  # the same views, masks and weights: the same numbers
    assert again["rows"] == res["rows"]


def test_the_same_volumes_as_train_and_heldout_score_identically(run_and_heldout, synth_cohort):
    """Both sets are built by one code path: only the volumes differ, so equal volumes leave no gap."""
    run, _, tmp = run_and_heldout
    res = _run(run, synth_cohort / "unlabeled", tmp / "same", "--heldout_volumes", "4",
               "--heldout_cache", str(tmp / "cache"))
    for row in res["rows"]:
        assert row["train"] == row["heldout"]


def test_bad_input_is_one_line_and_writes_nothing(run_and_heldout, tmp_path, capsys):
    run, heldout, _ = run_and_heldout
    cases = [(["--run", str(tmp_path)], "--run"),
             (["--run", str(run), "--train_volumes", "9"], "--train_volumes 9"),
             (["--run", str(run), "--epochs", "0"], "--epochs"),
             (["--run", str(run), "--heldout_volumes", "3"], "--heldout_volumes 3"),
             (["--run", str(run), "--heldout", str(tmp_path / "nowhere")], "nowhere")]
    for args, says in cases:
        argv = ["--heldout", str(heldout), "--out", str(tmp_path / "out"), "--train_volumes", "4", "--heldout_volumes",
                "2", "--no_progress", *args]
        with pytest.raises(SystemExit) as e:
            pretrain_heldout.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err, (args, err)
    assert not (tmp_path / "out").exists()

"""--figures false: a fine-tuning run (and finetune.evaluate) writes the same numbers and no PNG, and the
ssl_gain toy preset's fine-tuning runs draw none while the cpu / gpu presets' still do."""
import json
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest

from core.cli import parse_config
from core.config import load_config, save_config
from finetune.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]


def _tiny_cfg(cohort: Path, out: Path, **over) -> FinetuneConfig:
    """tests/test_finetune_loop.py's smallest run (depth-2 encoder, 2 folds) at 1 epoch; multitask, so that
    every figure kind (ROC, calibration, Kaplan-Meier) would be drawn."""
    cfg = load_config(FinetuneConfig, ROOT / "launch" / "finetune_tiny_cpu.yaml")
    cfg.manifest, cfg.external = str(cohort / "manifest.csv"), str(cohort / "external.csv")
    cfg.output_dir, cfg.cache_dir = str(out), str(out.parent / "cache")
    cfg.mixed_precision, cfg.n_boot, cfg.explain, cfg.epochs, cfg.folds = "no", 20, 0, 1, 2
    cfg.model.encoder.depth = 2
    cfg.model.task, cfg.model.fusion = "multitask", "concat"
    return replace(cfg, **over)


def _numbers(metrics: dict) -> dict:
    """metrics.json less the list of figures written (what the flag is meant to change)."""
    return {k: v for k, v in metrics.items() if k != "figures"}


def test_the_flag_parses_and_help_says_what_it_is_for(capsys):
    assert FinetuneConfig().figures is True
    cfg, _ = parse_config(FinetuneConfig, ["--figures", "false"])
    assert cfg.figures is False
    with pytest.raises(SystemExit):
        parse_config(FinetuneConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--figures" in text and "false for sweeps and tests where nobody looks at them" in text


def test_evaluate_without_figures_gives_the_same_metrics_and_no_png(tmp_path, capsys):
    from finetune.evaluate import evaluate, main
    from tests.test_evaluate import make_cohort
    manifest, external, pred = make_cohort(tmp_path)
    outcomes = pd.concat([manifest, external], ignore_index=True)
    drawn = evaluate(pred, outcomes, out_dir=tmp_path / "drawn", n_boot=20, seed=0)
    bare = evaluate(pred, outcomes, out_dir=tmp_path / "bare", n_boot=20, seed=0, figures=False)
    assert len(drawn["figures"]) == 12 and len(list((tmp_path / "drawn").glob("*.png"))) == 12
    assert bare["figures"] == [] and not list((tmp_path / "bare").glob("*.png"))
    assert _numbers(json.loads((tmp_path / "bare" / "metrics.json").read_text())) == \
        _numbers(json.loads((tmp_path / "drawn" / "metrics.json").read_text()))
    # Unset, the flag is the fine-tuning run's own (its config.yaml in the folder), as n_boot and seed are.
    run_dir = tmp_path / "run_without_figures"
    run_dir.mkdir()
    save_config(FinetuneConfig(figures=False), run_dir / "config.yaml")
    assert evaluate(pred, outcomes, out_dir=run_dir, n_boot=0)["figures"] == []
    assert not list(run_dir.glob("*.png"))
    # The CLI re-evaluating that run follows it, unless --figures true asks for them.
    pred.to_csv(run_dir / "predictions.csv", index=False)
    argv = ["--predictions", str(run_dir / "predictions.csv"), "--manifest", str(tmp_path / "manifest.csv"),
            "--external", str(tmp_path / "external.csv"), "--n_boot", "0"]
    assert main(argv) == 0 and not list(run_dir.glob("*.png"))
    assert "no figures (figures from" in capsys.readouterr().out
    assert main(argv + ["--figures", "true"]) == 0 and len(list(run_dir.glob("*.png"))) == 12


def test_a_run_without_figures_writes_the_same_numbers_and_predictions_and_no_png(synth_cohort, tmp_path):
    from finetune.train import run
    runs = {flag: tmp_path / f"figures_{flag}" for flag in (True, False)}
    metrics = {flag: run(_tiny_cfg(synth_cohort, out, figures=flag)) for flag, out in runs.items()}
    drawn, bare = runs[True], runs[False]
    assert {p.name for p in drawn.glob("*.png")} == {f"{kind}_{split}.png" for kind in ("roc", "calibration", "km")
                                                     for split in ("val", "test", "external")}
    assert not list(bare.rglob("*.png"))
    assert metrics[False]["figures"] == []
    saved = {flag: json.loads((out / "metrics.json").read_text()) for flag, out in runs.items()}
    for entry in saved.values():  # each fold's record less its folder (the run's own) and fingerprint (the config's)
        entry["folds"] = [{k: v for k, v in fold.items() if k not in ("folder", "fingerprint")}
                          for fold in entry["folds"]]
    assert saved[True]["splits"]["test"]["classification"]["auc"] is not None
    assert _numbers(saved[False]) == _numbers(saved[True])
    for table in ("predictions.csv", "splits.json"):
        assert (bare / table).read_text() == (drawn / table).read_text()


def test_the_flag_leaves_the_fold_fingerprint_alone():
    from finetune.train import fold_fingerprint
    splits = {"folds": [{"train": ["a"], "val": ["b"]}]}
    cfg = FinetuneConfig()
    assert fold_fingerprint(replace(cfg, figures=False), splits) == fold_fingerprint(cfg, splits)


def test_the_toy_preset_alone_fine_tunes_without_figures(tmp_path):
    from benchmarks.research.ssl_gain.presets import PRESETS, Run, resolve_preset
    from benchmarks.research.ssl_gain.stages import finetune_config
    run = Run("ft_mim_none", "", "none", "multitask", "cls")

    def figures(preset):
        return finetune_config(preset, tmp_path, 0, run.name, pretrained="", fusion=run.fusion, task=run.task,
                               splits=tmp_path / "splits.json").figures
    assert figures(resolve_preset("cpu", toy=True)) is False
    assert figures(PRESETS["cpu"]) is True and figures(PRESETS["gpu"]) is True


def test_a_folder_made_before_the_preset_knew_the_flag_is_still_the_same_preset(tmp_path):
    """The flag changes no number, so a benchmark folder of the cpu preset written before it existed is resumed,
    not refused as another preset's."""
    from benchmarks.research.ssl_gain.presets import PRESETS
    from benchmarks.research.ssl_gain.stages import check_same_preset
    before = {k: v for k, v in json.loads(json.dumps(asdict(PRESETS["cpu"]))).items() if k != "finetune_figures"}
    (tmp_path / "preset.json").write_text(json.dumps(before))
    check_same_preset(PRESETS["cpu"], tmp_path)

"""benchmarks.ssl_gain end to end at the toy size: every model x test set is reported (an AUC in [0, 1]
or null with a reason), the table and the ROC figures are written, and a rerun skips every finished
stage. The numbers themselves mean nothing at this size and are not checked."""
import json

import pytest

from benchmarks import ssl_gain

MODELS = ("mim", "multimodal", "scratch", "mae", "radiomics", "clinical_only", "oracle")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl_gain")
    assert ssl_gain.main(["--preset", "cpu", "--toy", "--out", str(out)]) == 0
    return out


def _check_metric(entry: dict, key: str):
    value = entry.get(key)
    if value is None:
        assert entry.get("reason"), f"{key} is null without a reason: {entry}"
    else:
        assert 0.0 <= value <= 1.0
        ci = entry.get("ci")
        if ci is not None:
            assert 0.0 <= ci[0] <= value <= ci[1] <= 1.0


def test_results_cover_every_model_and_test_set(toy_run):
    results = json.loads((toy_run / "results.json").read_text())
    assert set(MODELS) <= set(results["summary"])
    assert results["seeds"] == [0]
    seed = results["per_seed"][0]
    assert seed["chosen_fusion"] in ssl_gain.TOY.fusions
    assert set(seed["fusion_val_auc"]) == set(ssl_gain.TOY.fusions)
    for model in MODELS:
        for split in ("test", "external"):
            entry = seed["models"][model][split]
            _check_metric(entry["classification"], "auc")
            _check_metric(entry["survival"], "c_index")
            summary = results["summary"][model][split]
            mean = summary["auc"]["mean"]
            assert (mean is None and summary["auc"].get("reason")) or 0.0 <= mean <= 1.0
            if model != ssl_gain.REFERENCE:  # paired DeLong against the MiM ViT: a p or a reason
                cmp = entry["classification"].get("vs_mim")
                if entry["classification"]["auc"] is not None:
                    assert cmp is not None and (cmp["p"] is None and cmp["reason"] or 0.0 <= cmp["p"] <= 1.0)
    # the fusion runs all share the held-out sets of the image-only run: identical splits
    ids = {m: sorted(seed["curves"]["external"][m]["label"]) for m in seed["curves"]["external"]}
    assert len({len(v) for v in ids.values()}) == 1
    assert "total_stage_seconds" in results and results["ordering"]


def test_table_and_figures_exist(toy_run):
    md = (toy_run / "results.md").read_text()
    for published in ("0.916", "0.764", "0.624", "0.496", "0.807", "0.691", "0.947", "0.821"):
        assert published in md
    assert "| model | test AUC (published) |" in md
    for name in ("roc_test.png", "roc_external.png"):
        data = (toy_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_rerun_skips_finished_stages(toy_run):
    before = {p: p.stat().st_mtime_ns for p in toy_run.rglob("predictions.csv")}
    results = ssl_gain.run_benchmark(ssl_gain.resolve_preset("cpu", toy=True), toy_run)
    status = results["stage_status"]
    assert status and all(v == "skipped" for v in status.values()), status
    assert {p: p.stat().st_mtime_ns for p in toy_run.rglob("predictions.csv")} == before


def test_other_preset_in_same_folder_is_refused(toy_run):
    with pytest.raises(ssl_gain.InputError, match="another preset"):
        ssl_gain.run_benchmark(ssl_gain.resolve_preset("gpu"), toy_run)


@pytest.mark.parametrize("name", sorted(ssl_gain.PRESETS))
def test_presets_resolve(name, tmp_path, capsys):
    """Every preset builds valid pretraining and fine-tuning configs (the gpu one is not run here)."""
    assert ssl_gain.main(["--preset", name, "--out", str(tmp_path / "x"), "--show"]) == 0
    text = capsys.readouterr().out
    preset = ssl_gain.resolve_preset(name)
    from data.config import load_config
    from pretrain.train import PretrainConfig
    from benchmarks.ssl_gain.stages import LAUNCH
    levels = load_config(PretrainConfig, LAUNCH / preset.pretrain_config).model.masks.levels
    assert levels > 1 and f"pretrain (levels={levels})" in text and "pretrain (levels=1)" in text
    assert "ft_mim_none" in text
    assert 100 <= preset.n_labeled and 20 <= preset.n_external and preset.test_fraction == 0.2
    assert not (tmp_path / "x").exists()

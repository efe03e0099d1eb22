"""The frozen-feature probe (benchmarks.probe) at toy size: it shows a gain where there is one (an encoder
built to measure a texture the targets depend on), none where there is none (another random init), gives
identical numbers on a rerun, and its bootstrap metrics equal scikit-learn's on resampled rows."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import r2_score, roc_auc_score

from benchmarks.probe import evaluate as ev
from benchmarks.probe import main
from benchmarks.probe.cohort import ensure_cohort, lesion_crops, load_cohort
from data.prep_config import PrepConfig
from models.input_spec import InputSpec, ViewSpec
from models.vit3d import ViT3D, ViT3DConfig

N, SEED = 48, 9001
CFG = ViT3DConfig(img_size=24, patch_size=6, dim=24, depth=2, heads=2)
VIEW = ViewSpec(centre="lesion", crop_mm=40.0, margin_mm=10.0)
SPEC = InputSpec(prep=PrepConfig(spacing=(2.0, 2.0, 2.0)), input_size=CFG.img_size, channels=("image",), view=VIEW)
FAST = ["--n_lesions", str(N), "--seed", str(SEED), "--repeats", "2", "--n_boot", "300", "--no_progress"]


def checkerboard(p: int) -> torch.Tensor:
    i = torch.arange(p)
    return ((i[:, None, None] + i[None, :, None] + i[None, None, :]) % 2 * 2 - 1).float()  # [p, p, p] of ±1


def texture(crops: np.ndarray) -> np.ndarray:
    """[N]: the lesion-weighted mean response of the image to a patch-sized 3D checkerboard: fine texture,
    unrelated to brightness, which a linear read-out of random features barely sees."""
    x = torch.from_numpy(crops)  # [N, 2, S, S, S]
    p = CFG.patch_size
    patches = x[:, 0].unfold(1, p, p).unfold(2, p, p).unfold(3, p, p)  # [N, g, g, g, p, p, p]
    response = (patches * checkerboard(p)).mean((-3, -2, -1)).flatten(1)  # [N, N_tok]
    weight = F.avg_pool3d(x[:, 1:], p).flatten(1)  # [N, N_tok], the probe's own pooling weights
    return ((weight * response).sum(1) / weight.sum(1)).numpy()


def texture_encoder(scale: float) -> ViT3D:
    """Every channel of the patch embedding measures the checkerboard response; blocks are identities."""
    torch.manual_seed(100)
    enc = ViT3D(CFG)
    p = CFG.patch_size
    with torch.no_grad():
        gains = torch.linspace(0.5, 2.0, CFG.dim) * scale  # [D]
        enc.patch_embed.weight.copy_(gains[:, None, None, None, None] * checkerboard(p) / p**3)
        enc.patch_embed.bias.copy_(torch.linspace(-2.0, 2.0, CFG.dim))  # varied offsets: LayerNorm keeps the signal
        enc.pos_embed.zero_()
        for blk in enc.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):  # zero residual branches: each block is the identity
                lin.weight.zero_()
                lin.bias.zero_()
    return enc


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 48-lesion cohort whose label and one latent are planted from the lesion texture, a texture
    encoder, and a random-init encoder (seed 7, not one of the controls' seeds), both with SPEC."""
    root = tmp_path_factory.mktemp("probe")
    cohort_dir = root / "cohort"
    ensure_cohort(cohort_dir, N, SEED, progress=False)
    t = texture(lesion_crops(load_cohort(cohort_dir, SPEC.prep, progress=False), SPEC.input_size, VIEW))
    manifest = pd.read_csv(cohort_dir / "manifest.csv", dtype={"subject_id": str})
    manifest["label"] = (t > np.median(t)).astype(int)
    manifest.to_csv(cohort_dir / "manifest.csv", index=False)
    oracle = pd.read_csv(cohort_dir / "oracle.csv", dtype={"subject_id": str}).set_index("subject_id")
    oracle = oracle.drop(columns=[c for c in oracle.columns if c.startswith("z_") and c != "z_rim"])
    oracle.loc[manifest["subject_id"], "z_texture"] = (t - t.mean()) / t.std()  # a real one (rim) and a planted one
    oracle.reset_index().to_csv(cohort_dir / "oracle.csv", index=False)
    texture_encoder(1.0 / t.std()).save_pretrained(root / "texture", input_spec=SPEC)
    torch.manual_seed(7)
    ViT3D(CFG).save_pretrained(root / "random7", input_spec=SPEC)
    return root


@pytest.fixture(scope="module")
def first_run(toy):
    return main(["--encoder", str(toy / "texture"), "--encoder", str(toy / "random7"), "--cohort_dir",
                 str(toy / "cohort"), "--out", str(toy / "out1"), *FAST])


def test_probe_shows_a_gain_where_there_is_one_and_none_where_there_is_none(toy, first_run):
    setup, = first_run["setups"]
    assert first_run["latents"] == ["z_rim", "z_texture"]
    tex, rnd = setup["encoders"]
    assert tex["groups"]["all"]["r2"][1] > 0.9 and tex["groups"]["all"]["auc"] > 0.9
    ctl = setup["random"]["summary"]["all"]
    assert ctl["r2"][1] < 0.3 and ctl["auc_mean"] < 0.8  # what random features read of the texture
    v = tex["vs_random"]["all"]
    assert v["auc_ci"][0] > 0 and v["r2_mean_ci"][0] > 0 and v["z_auc"] > 2 and v["z_r2_mean"] > 2
    w = rnd["vs_random"]["all"]
    assert w["auc_ci"][0] < 0 < w["auc_ci"][1] and w["r2_mean_ci"][0] < 0 < w["r2_mean_ci"][1]
    md = (toy / "out1" / "probe.md").read_text()
    assert f"verdict {toy / 'texture'}: GAIN" in md and f"verdict {toy / 'random7'}: NO GAIN" in md
    # four groups (two blocks x two poolings) plus their concatenation, baselines, oracle
    assert list(tex["groups"]) == ["mid_mean", "mid_mask", "last_mean", "last_mask", "all"]
    assert set(setup["baselines"]) == {"pixel", "handmade"} and 0 <= first_run["oracle"]["auc"] <= 1
    saved = json.loads((toy / "out1" / "probe.json").read_text())
    assert saved["command"].startswith("python -m benchmarks.probe") and saved["machine"] and saved["date"]
    assert "| model | features | AUC |" in md
    assert 0 <= first_run["oracle"]["latents_auc"] <= 1 and "logistic on the true latents" in md


def test_probe_reports_the_geometry_of_the_features_the_head_reads(toy, first_run):
    from benchmarks.probe.geometry import geometry
    setup, = first_run["setups"]
    tex = setup["encoders"][0]
    assert set(tex["geometry"]) == {"median_sd", "mean_norm", "anisotropy", "effective_rank", "top_pc_share"}
    assert setup["random"]["geometry"]["median_sd"][1] >= 0  # [mean, SD] over the random seeds
    # the random7 encoder's row is the geometry of its own last_mask features
    from benchmarks.probe.cohort import lesion_crops
    from benchmarks.probe.features import encoder_features
    from benchmarks.probe.run import load_encoder
    crops = lesion_crops(load_cohort(toy / "cohort", SPEC.prep, progress=False), SPEC.input_size, VIEW)
    feats = encoder_features(load_encoder(str(toy / "random7"))[0], crops, progress=False)
    assert setup["encoders"][1]["geometry"] == pytest.approx(geometry(feats["last_mask"]))
    assert "Feature geometry of the 'last_mask' features" in (toy / "out1" / "probe.md").read_text()


def test_geometry_against_hand_computations():
    from benchmarks.probe.geometry import geometry
    # two orthogonal unit vectors and their negatives: mean pairwise cosine (0+-1+0+0+-1+0)*2/12 = -1/3
    X = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    g = geometry(X)
    assert g["anisotropy"] == pytest.approx(-1 / 3) and g["mean_norm"] == pytest.approx(1.0)
    assert g["effective_rank"] == pytest.approx(2.0) and g["top_pc_share"] == pytest.approx(0.5)
    assert g["median_sd"] == pytest.approx(np.std([1, 0, -1, 0], ddof=1))
    # every vector on one line, far from the origin: anisotropy 1, one direction of variance
    line = np.outer(np.arange(1.0, 6.0), [3.0, 4.0])  # [5, 2]
    g = geometry(line)
    assert g["anisotropy"] == pytest.approx(1.0) and g["effective_rank"] == pytest.approx(1.0)
    assert g["top_pc_share"] == pytest.approx(1.0) and g["mean_norm"] == pytest.approx(15.0)
    # scale: median SD and norm scale with the features, the shape statistics do not
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(50, 8))
    a, b = geometry(Z), geometry(3 * Z)
    assert b["median_sd"] == pytest.approx(3 * a["median_sd"]) and b["mean_norm"] == pytest.approx(3 * a["mean_norm"])
    for k in ("anisotropy", "effective_rank", "top_pc_share"):
        assert b[k] == pytest.approx(a[k])


def test_a_rerun_gives_identical_numbers_on_the_saved_splits(toy, first_run):
    splits = next((toy / "cohort").glob("probe_splits_*.json"))
    mtime = splits.stat().st_mtime_ns
    again = main(["--encoder", str(toy / "texture"), "--random_only", "--random_seeds", "0", "1",
                  "--cohort_dir", str(toy / "cohort"), "--out", str(toy / "out2"), *FAST])
    a, b = first_run["setups"][0], again["setups"][0]
    assert b["encoders"] == [] and splits.stat().st_mtime_ns == mtime  # splits reused, not redrawn
    assert b["random"]["per_seed"][0]["groups"] == a["random"]["per_seed"][0]["groups"]
    assert b["random"]["per_seed"][1]["groups"] == a["random"]["per_seed"][1]["groups"]
    assert b["baselines"]["pixel"]["groups"] == a["baselines"]["pixel"]["groups"]
    assert b["baselines"]["handmade"]["groups"] == a["baselines"]["handmade"]["groups"]


def test_bad_input_is_one_line_and_exit_2(toy, tmp_path, capsys):
    two = tmp_path / "two_channel"
    ViT3D(ViT3DConfig(**{**CFG.__dict__, "in_channels": 2})).save_pretrained(
        two, input_spec=InputSpec(prep=SPEC.prep, input_size=24, channels=("image", "lesion_mask"), view=VIEW))
    cases = [([*FAST, "--encoder", str(two)], "1-channel"),
             ([*FAST, "--encoder", str(toy / "texture"), "--seed", "5"], "holds seed 9001"),
             ([*FAST], "--encoder DIR is required")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--cohort_dir", str(toy / "cohort"), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err


def test_bootstrap_metrics_equal_sklearn_on_the_resampled_rows():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(30), 2)[:50]  # some patients with two lesions
    label = rng.integers(0, 2, 50)
    s = np.round(rng.normal(size=50) + label, 1)  # rounded: ties count one half
    Z, P = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    W = ev.bootstrap_weights(patients, 5, seed=1)  # [5, 50]
    for w, auc, r2 in zip(W, ev.weighted_auc(W, label, s), ev.weighted_r2(W, Z, P)):
        rows = np.repeat(np.arange(50), w.astype(int))
        assert auc == pytest.approx(roc_auc_score(label[rows], s[rows]))
        np.testing.assert_allclose(r2, r2_score(Z[rows], P[rows], multioutput="raw_values"))
        assert all(w[patients == p].min() == w[patients == p].max() for p in np.unique(patients))
    for train, test in (f for rep in ev.cv_splits(label, patients, 5, 2, 0) for f in rep):
        assert not set(patients[train]) & set(patients[test])


def test_supervised_ceiling_trains_and_saves_an_encoder_the_probe_reads(toy, tmp_path, capsys):
    """benchmarks.research.probe_ceiling: the loss falls, the encoder is saved with --like's contract and config,
    and training on the probe cohort's own seed is refused in one line."""
    from benchmarks.research import probe_ceiling as supervised
    from benchmarks.probe.run import load_encoder
    from models.input_spec import load_input_spec
    with pytest.raises(SystemExit) as e:
        supervised.main(["--like", str(toy / "random7"), "--out", str(tmp_path / "bad"), "--seed", str(SEED)])
    assert e.value.code == 2 and "probe cohort" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "sup"
    rec = supervised.main(["--like", str(toy / "random7"), "--out", str(out), "--seed", "7007", "--n_lesions", "16",
                           "--cohort_dir", str(tmp_path / "cohort"), "--epochs", "25", "--batch_size", "8",
                           "--lr", "3e-3", "--no_progress"])
    first, last = rec["log"][0], rec["log"][-1]
    assert last["loss_latents"] < 0.7 * first["loss_latents"] and last["loss_label"] < first["loss_label"]
    encoder, spec = load_encoder(str(out / "encoder"))
    assert spec == load_input_spec(toy / "random7") and encoder.config == CFG
    assert rec["cohort"]["seed"] == 7007 and rec["latents"][0].startswith("z_")


def test_noisy_latents_have_the_asked_r2_by_sklearns_linear_fit():
    from sklearn.linear_model import LinearRegression

    from benchmarks.research.probe_headroom import noisy_latents
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((20000, 3)) * [1.0, 2.0, 0.5]  # [N, K], unequal scales
    X = noisy_latents(Z, np.array([0.2, 0.5, 1.0]), np.random.default_rng(1))
    got = [LinearRegression().fit(X[:, [k]], Z[:, k]).score(X[:, [k]], Z[:, k]) for k in range(3)]
    assert np.allclose(got, [0.2, 0.5, 1.0], atol=0.015), got


def test_headroom_curve_rises_to_the_probes_image_only_ceiling(toy, first_run, tmp_path):
    from benchmarks.research.probe_headroom import main as headroom
    res = headroom(["--probe", str(toy / "out1" / "probe.json"), "--out", str(tmp_path / "h"),
                    "--r2", "0.02", "0.3", "1.0", "--draws", "2"])
    curve = {c["noise_r2"]: c for c in res["curve"]}
    assert curve[1.0]["auc"] == pytest.approx(first_run["oracle"]["latents_auc"], abs=1e-12)  # no noise: that row
    assert curve[1.0]["r2_mean"] > 0.95  # the probe's ridge reads exact latents back
    assert curve[0.02]["auc"] < curve[0.3]["auc"] < curve[1.0]["auc"]
    assert curve[0.02]["r2_mean"] < curve[0.3]["r2_mean"] < curve[1.0]["r2_mean"]
    rows = {r["name"]: r for r in res["rows"]}
    tex, rnd = rows[str(toy / "texture")], rows["random init (mean of 3)"]
    assert tex["r2_mean"] == first_run["setups"][0]["encoders"][0]["groups"]["all"]["r2_mean"]
    assert {"pixel", "handmade", str(toy / "random7")} <= set(rows)
    bar, = res["bars"]
    assert bar["r2_needed"] is None or bar["r2_needed"] > rnd["r2_mean"]
    assert {p.name for p in (tmp_path / "h").iterdir()} == {"headroom.json", "headroom.md", "headroom.png"}


def test_headroom_reads_the_curve_both_ways_within_its_range_only():
    from benchmarks.research.probe_headroom import auc_on_curve, r2_on_curve
    curve = [{"r2_mean": x, "auc": y} for x, y in ((0.1, 0.6), (0.3, 0.7), (0.2, 0.68), (0.5, 0.66), (0.9, 0.9))]
    # by R²: 0.1 -> 0.6, 0.2 -> 0.68, 0.3 -> 0.7, then the dip at 0.5 is lifted to 0.7 (the need cannot fall)
    assert auc_on_curve(curve, 0.15) == pytest.approx(0.64)
    assert auc_on_curve(curve, 0.5) == pytest.approx(0.7)
    assert auc_on_curve(curve, 0.05) is None and auc_on_curve(curve, 0.95) is None
    assert r2_on_curve(curve, 0.69) == pytest.approx(0.25)
    assert r2_on_curve(curve, 0.8) == pytest.approx(0.5 + 0.4 * 0.5)  # first reached after the plateau
    assert r2_on_curve(curve, 0.6) == pytest.approx(0.1)
    assert r2_on_curve(curve, 0.55) is None and r2_on_curve(curve, 0.95) is None


def test_headroom_bad_input_is_one_line_and_exit_2(toy, first_run, tmp_path, capsys):
    from benchmarks.research.probe_headroom import main as headroom
    moved = json.loads((toy / "out1" / "probe.json").read_text())
    moved["protocol"]["splits"] = str(tmp_path / "gone.json")
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    good = str(toy / "out1" / "probe.json")
    before = sorted(p.name for p in (toy / "cohort").iterdir())
    cases = [(["--probe", str(tmp_path / "none.json")], "cannot read it"),
             (["--probe", str(tmp_path)], "cannot read it"),
             (["--probe", str(tmp_path / "moved.json")], "splits file"),
             (["--probe", good, "--r2", "0", "0.5"], "--r2"),
             (["--probe", good, "--draws", "0"], "--draws"),
             (["--probe", good, "--margin", "nan"], "--margin")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            headroom([*argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists() and sorted(p.name for p in (toy / "cohort").iterdir()) == before

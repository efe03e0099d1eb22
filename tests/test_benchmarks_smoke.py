"""Smoke tests of the speed benchmarks: each main runs at a toy size with one timed step and returns its
table with the expected rows and columns. No timing is asserted (2 shared cores)."""
from benchmarks import common
from benchmarks.speed import pretrain as pretrain_speed
from benchmarks.speed import throughput


def test_pretrain_speed_table():
    table = pretrain_speed.main(["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--batch", "1",
                                 "--crop-size", "48", "--no-isolate", "--quiet"])
    assert table.columns == ["model", "levels", "sub-vols/step", "loader ms", "data wait", "step ms", "sub-vol/s",
                             "ours ÷ MONAI", "model FLOP/s", "peak memory MiB"]
    assert table.column("model") == [pretrain_speed.MONAI, pretrain_speed.MONAI_SDPA, "mimfm MiM",
                                     "mimfm MiM L=1 (MAE)", "mimfm MiM + self-distillation",
                                     "mimfm MiM + self-distillation, decoder teacher"]
    assert table.column("levels") == ["1", "1", "3", "1", "3", "3"]
    # One level-1 crop with L=3, K=2 is 1 + 2 + 4 sub-volumes; every row trains on that many.
    assert table.column("sub-vols/step") == ["7"] * 6
    assert table.column("ours ÷ MONAI")[0] == "1.00x"
    assert table.column("loader ms")[:2] == ["—", "—"]
    # our rows build their levels inside the step (pretrain.batches.LevelBuilder), as the training loop does
    assert all(float(c) > 0 for c in table.column("loader ms")[2:])
    assert all(c.endswith("%") for c in table.column("data wait")[2:])
    for cell in table.column("step ms") + table.column("sub-vol/s"):
        assert float(cell) > 0
    assert "| model | levels |" in table.markdown()


def test_pretrain_speed_builds_the_levels_inside_the_step_from_crops():
    # As pretrain/train.py: beside the step only crops are collated (CropCollate); the step itself builds the
    # levels of the micro-batch it was handed (LevelBuilder), on the runner's device.
    import torch
    model = pretrain_speed.load_preset(pretrain_speed.PRESETS["tiny"]).model
    row = pretrain_speed.Row("mimfm MiM", "mim", model.masks.levels)
    spec = pretrain_speed.spec_for(row, model, 1, config=pretrain_speed.PRESETS["tiny"], device="cpu", crop_size=48)
    runner = pretrain_speed.PretrainRunner(spec)
    assert set(runner.ready) == {"crops", "anchors", "index", "m"}
    built, build = [], runner.build_levels
    runner.build_levels = lambda batch, device: built.append((batch["m"], device)) or build(batch, device)
    samples = [runner.step() for _ in range(2)]
    assert built == [(0, torch.device("cpu")), (1, torch.device("cpu"))]
    assert all(s["levels"] > 0 for s in samples)
    assert set(runner.ready) == {"crops", "anchors", "index", "m"} and runner.ready["m"] == 2


def test_throughput_table():
    table = throughput.main(["--device", "cpu", "--repeats", "1", "--warmup", "0", "--pretrain-batch", "1",
                             "--crop-size", "48", "--batch", "2", "--loader-size", "16", "--loader-n", "2",
                             "--loader-repeats", "1", "--loader-workers", "1", "--no-isolate", "--quiet"])
    assert table.columns == ["stage", "what is timed", "batch", "median ms", "throughput", "peak memory MiB"]
    assert table.column("stage") == ["pretraining (MiM, L=3)", "fine-tuning", "inference",
                                     "data: cache (.npy), 1 process", "data: .nii.gz, 1 process",
                                     "data: cache (.npy), DataLoader", "data: .nii.gz, DataLoader"]
    assert table.column("throughput")[0].endswith("sub-vol/s")
    assert all(c.endswith("vol/s") for c in table.column("throughput"))
    assert "7 sub-vols" in table.column("batch")[0]


def test_update_section_keeps_other_sections(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Data loader\n\nkeep me\n")
    common.update_section(doc, "Speed table (CPU)", "first")
    common.update_section(doc, "Other", "other body")
    common.update_section(doc, "Speed table (CPU)", "second")
    text = doc.read_text()
    assert "keep me" in text and "other body" in text and "second" in text and "first" not in text
    assert text.count("## Speed table (CPU)") == 1


def test_flops_count():
    # One block on N tokens: 2N(4D^2 + 2DM) + 4N^2 D.
    assert common.block_flops(10, 6, 24) == 2 * 10 * (4 * 36 + 2 * 6 * 24) + 4 * 100 * 6


def test_largest_batch_bisection(monkeypatch):
    # The GPU-only search, with OOM simulated above 37.
    monkeypatch.setattr(pretrain_speed, "fits", lambda spec: spec["batch"] <= 37)
    assert pretrain_speed.largest_batch({"batch": 1}) == 37
    monkeypatch.setattr(pretrain_speed, "fits", lambda spec: False)
    assert pretrain_speed.largest_batch({"batch": 1}) == 0


def test_gpu_table_columns():
    # The CUDA table (MFU, checkpointing rows, largest batch) from made-up measurements.
    args = pretrain_speed.parse_args(["--preset", "base", "--repeats", "2", "--warmup", "0"])
    args.device, args.checkpointing = "cuda", "both"
    model = pretrain_speed.load_preset(args.config).model
    rows = pretrain_speed.rows_for(model, "both")
    results = {}
    for r in rows:
        results[r.name] = common.Measured(samples=[{"step": 0.5, "levels": 0.01}] * 2,
                                          info={"subvolumes": 224, "flops": 1e14}, memory={"peak_mib": 1000.0})
    table = pretrain_speed.build_table(args, model, rows, results, {pretrain_speed.MONAI: (448, 300.0)})
    assert table.columns[-3:] == ["peak memory MiB", "largest batch (sub-vols)", "sub-vol/s at largest"]
    assert "MFU" in table.columns
    assert table.column("model") == [pretrain_speed.MONAI, pretrain_speed.MONAI_SDPA, "mimfm MiM",
                                     "mimfm MiM L=1 (MAE)", "mimfm MiM, grad ckpt", "mimfm MiM L=1 (MAE), grad ckpt",
                                     "mimfm MiM + self-distillation", "mimfm MiM + self-distillation, decoder teacher"]
    assert table.column("largest batch (sub-vols)")[:2] == ["448", "—"]


def test_crop_scale_probe_runs_every_model(synth_cohort, tmp_path):
    import numpy as np

    from benchmarks.research import crop_scale_probe
    common_args = ["--cohort", str(synth_cohort), "--cache", str(tmp_path / "cache"), "--folds", "2"]
    feats = crop_scale_probe.main(common_args + ["--model", "features", "--labels", "latent"])
    assert len(feats["fold_aucs"]) == 2 and 0.0 <= feats["oof_auc"] <= 1.0
    assert abs(feats["labels"].mean() - 0.5) <= 1 / len(feats["labels"])  # latent labels split at the median
    vit = crop_scale_probe.main(common_args + ["--model", "vit", "--epochs", "1", "--crop", "native"])
    assert len(vit["fold_aucs"]) == 2 and np.isfinite(vit["oof_auc"])
    linear = crop_scale_probe.main(common_args + ["--model", "linear"])
    assert len(linear["fold_aucs"]) == 2 and 0.0 <= linear["oof_auc"] <= 1.0


def test_run_and_report_writes_the_section(tmp_path):
    import argparse
    doc = tmp_path / "BENCHMARKS.md"
    table = common.Table(["a"], rows=[["1"]], notes=["a note"])
    args = argparse.Namespace(write_docs=True, doc=doc, device="cpu")
    assert common.run_and_report(args, lambda a: table, "python -m x --y", "X (CPU)", load_note=" (why)") is table
    text = doc.read_text()
    assert "## X (CPU)" in text and "- command: `python -m x --y`" in text and "so absolute times are noisy (why)" in text
    assert "- a note" in text and "| a |" in text


def test_finetune_recipe_results_gather_every_invocation(tmp_path):
    """A second invocation with other variants keeps the first one's rows; a re-run row replaces its old one."""
    import json

    from benchmarks.research.finetune_recipe import merge_rows
    from core.atomic import write_json

    path = tmp_path / "results.json"
    first = [{"seed": 0, "model": m, "variant": "base", "dev_auc": 0.6} for m in ("mim", "scratch")]
    write_json(path, merge_rows(path, first, "cmd --variants base"))
    second = [{"seed": 0, "model": "mim", "variant": "lp_ft", "dev_auc": 0.7},
              {"seed": 0, "model": "mim", "variant": "base", "dev_auc": 0.65}]
    merged = merge_rows(path, second, "cmd --variants lp_ft base")
    got = {(r["model"], r["variant"]): r["dev_auc"] for r in merged["rows"]}
    assert got == {("mim", "base"): 0.65, ("scratch", "base"): 0.6, ("mim", "lp_ft"): 0.7}
    assert merged["commands"] == ["cmd --variants base", "cmd --variants lp_ft base"]
    assert json.loads(path.read_text())["commands"] == ["cmd --variants base"]


def _zero_memory_refusal(capsys, monkeypatch, argv):
    """zero_memory's main on `argv` with every launch forbidden: (exit code, stderr)."""
    import pytest

    from benchmarks.speed import zero_memory
    monkeypatch.setattr(zero_memory, "launch", lambda *a: pytest.fail("a rank started before the flags were checked"))
    with pytest.raises(SystemExit) as e:
        zero_memory.main(argv)
    return e.value.code, capsys.readouterr().err.strip()


def test_zero_memory_refuses_a_zero3_config_that_is_not_stage_3(capsys, monkeypatch, tmp_path):
    from benchmarks.speed import zero_memory
    zero2 = zero_memory.ROOT / "launch" / "deepspeed" / "zero2.json"
    code, err = _zero_memory_refusal(capsys, monkeypatch, ["--model", "tiny", "--zero3_config", str(zero2)])
    assert code == 2 and "\n" not in err and "--zero3_config" in err and str(zero2) in err and "stage 2" in err
    code, err = _zero_memory_refusal(capsys, monkeypatch, ["--model", "tiny", "--zero3_config", str(tmp_path / "no.json")])
    assert code == 2 and "\n" not in err and "--zero3_config" in err and "no.json" in err


def test_zero_memory_refuses_an_input_edge_off_the_patch_grid(capsys, monkeypatch):
    # tiny's patch is 12 voxels (launch/pretrain_tiny_cpu.yaml)
    code, err = _zero_memory_refusal(capsys, monkeypatch, ["--model", "tiny", "--img_size", "20"])
    assert code == 2 and "\n" not in err and "--img_size" in err and "12" in err


def test_zero_memory_refuses_a_model_the_host_cannot_hold(capsys, monkeypatch):
    from benchmarks.speed import zero_memory
    monkeypatch.setattr(zero_memory, "_meminfo_mib", lambda field: 4096.0)
    code, err = _zero_memory_refusal(capsys, monkeypatch, ["--model", "large"])
    assert code == 2 and "\n" not in err and "--model large" in err and "4,096 MiB available" in err


def test_zero_memory_large_is_vit_l_and_its_json_reaches_only_zero3_rows(monkeypatch, tmp_path):
    from benchmarks.speed import zero_memory
    monkeypatch.setattr(zero_memory, "_meminfo_mib", lambda field: float("inf"))  # whatever this host has free
    lean = tmp_path / "zero3_other.json"  # any stage-3 JSON other than the YAML's own
    lean.write_text((zero_memory.ROOT / "launch" / "deepspeed" / "zero3.json").read_text())
    args = zero_memory.check_args(zero_memory.parse_args(["--model", "large", "--zero3_config", str(lean)]))
    enc = zero_memory.encoder_config("large", None)
    assert (enc.dim, enc.depth, enc.img_size, args.img_size) == (1024, 24, 32, 32)
    # By hand: patch embedding 16^3*1024 + 1024, learned positions 8 tokens x 1024, 24 blocks of
    # 12 d^2 + 13 d (qkv, projection, two MLP layers, two norms), final norm 2 d.
    d = 1024
    assert zero_memory.trained_params(enc) == 16**3 * d + d + 8 * d + 24 * (12 * d * d + 13 * d) + 2 * d
    for mode in zero_memory.MODES:
        cmd, env = zero_memory.launch_command(mode, args, tmp_path)
        assert cmd[cmd.index("--model") + 1] == "large" and cmd[cmd.index("--img_size") + 1] == "32"
        assert env["MALLOC_MMAP_THRESHOLD_"] == "131072"  # every row under the same allocator
        if mode.startswith("zero3"):
            assert cmd[cmd.index("--deepspeed_config_file") + 1] == str(lean)
        else:
            assert "--deepspeed_config_file" not in cmd
    args.mmap_threshold = 0  # glibc's own sliding threshold, even where the caller's environment sets one
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    assert "MALLOC_MMAP_THRESHOLD_" not in zero_memory.launch_command("ddp", args, tmp_path)[1]


def test_prepare_scaling_prepares_each_volume_once_on_1_and_2_ranks(tmp_path, capsys):
    """4 tiny volumes, an empty cache per rank count: every volume is built exactly once across the ranks,
    rank r builds rows r::2, and each cache holds one entry per volume, named by its own subject."""
    import json

    from benchmarks.speed import prepare_scaling
    out = prepare_scaling.main(["--volumes", "4", "--shape", "12", "14", "10", "--workdir", str(tmp_path),
                                "--out", str(tmp_path / "scaling.json")])
    one, two = out["measured"]
    assert (one["ranks"], one["built"], one["rows"]) == (1, [4], [4])
    assert (two["ranks"], two["built"], two["rows"]) == (2, [2, 2], [2, 2])
    assert two["indexed"] == [4, 4]  # after the gather every rank has the whole table
    for world in (1, 2):
        metas = list((tmp_path / f"cache-{world}").rglob("meta.json"))
        assert sorted(json.loads(m.read_text())["subject_id"] for m in metas) == [f"vol{i:04d}" for i in range(4)]
    assert json.loads((tmp_path / "scaling.json").read_text())["args"]["volumes"] == 4
    assert "| 2 | 4 |" in capsys.readouterr().out


def test_prepare_scaling_projection_by_hand():
    """The projection's arithmetic on given inputs: a rank hashes its share on one core, then prepares it over
    its cores; rank 0 alone does everything on one core; the array job's tasks do what a rank does."""
    from benchmarks.speed.prepare_scaling import ISSUE_SHAPE, ProjectionInputs, inputs_from, project
    inputs = ProjectionInputs(prepare_s=0.5, hash_s=0.1, gpus=4, array_tasks=2, dist_timeout_min=15.0)
    small = project(inputs, volumes=10, cores=2)
    # share ceil(10/4) = 3: 3 x 0.1 hashing + ceil(3/2) = 2 rounds x 0.5; array: 5 x 0.1 + 3 x 0.5
    assert small["share"] == 3
    assert abs(small["in_run_s"] - 1.3) < 1e-9 and abs(small["array_s"] - 2.0) < 1e-9
    assert small["rank_compute_s"] == small["in_run_s"] and small["storage_s"] == 0  # no file sizes given
    assert abs(small["serial_rank0_s"] - 6.0) < 1e-9 and abs(small["gpu_hours_waiting"] - 1.3 * 4 / 3600) < 1e-12
    big = project(inputs, volumes=10000, cores=2)  # 2500 x 0.1 + 1250 x 0.5 = 875 s: past 600 s, within 15 min
    assert abs(big["in_run_s"] - 875.0) < 1e-9
    assert (big["within_nccl_600s"], big["within_dist_timeout"]) == (False, True)
    # a slow file system: 10 x (2 reads of 100 MB + 50 MB written) at 0.5 GB/s = 5 s, longer than any compute
    slow_io = ProjectionInputs(prepare_s=0.5, hash_s=0.1, file_mb=100, entry_mb=50, storage_gb_s=0.5, gpus=4)
    io = project(slow_io, volumes=10, cores=2)
    assert abs(io["storage_s"] - 5.0) < 1e-9 and abs(io["in_run_s"] - 5.0) < 1e-9
    assert abs(io["rank_compute_s"] - 1.3) < 1e-9
    assert abs(io["serial_rank0_s"] - 6.0) < 1e-9
    # scaled by voxel count from a volume of 1/8 the issue's: 0.1 s hashing and 0.2 s preparing each become x8
    half = tuple(s // 2 for s in ISSUE_SHAPE)
    scaled = inputs_from({"volumes": 4, "cpu_per_volume_s": 0.3}, {"seconds": 0.4, "bytes": 4e6}, 2e6, half,
                         gpus=64, array_tasks=64, storage_gb_s=10.0)
    assert abs(scaled.hash_s - 0.8) < 1e-9 and abs(scaled.prepare_s - 1.6) < 1e-9
    assert abs(scaled.file_mb - 8.0) < 1e-9 and abs(scaled.entry_mb - 4.0) < 1e-9  # 1 MB and 0.5 MB each, x8
    assert scaled.dist_timeout_min == 30.0  # engine.config.LoopConfig's default


def test_prepare_scaling_names_a_bad_flag_before_writing_anything(tmp_path, capsys):
    import pytest

    from benchmarks.speed import prepare_scaling
    with pytest.raises(SystemExit):
        prepare_scaling.main(["--ranks", "2", "--workdir", str(tmp_path / "w")])
    assert "--ranks" in capsys.readouterr().err and not (tmp_path / "w").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "cache-1").mkdir()
    with pytest.raises(SystemExit):
        prepare_scaling.main(["--workdir", str(tmp_path / "used")])
    assert "--workdir" in capsys.readouterr().err


def test_zero_memory_writes_the_vit_b_section_only_from_a_vit_b_run(capsys, monkeypatch):
    """--write-docs replaces the "(ViT-B, 2 ranks)" section: another model's table would land under that
    heading and erase ViT-B's, so it is refused before any rank starts."""
    code, err = _zero_memory_refusal(capsys, monkeypatch, ["--model", "tiny", "--write-docs"])
    assert code == 2 and "\n" not in err and "--write-docs" in err and "--model base" in err

"""Preparing at scale (issue 36): every rank or `--shard I/N` job prepares its share of the table, writers
meeting on one entry leave one whole entry, a killed preparation leaves no half entry, and a stage's YAML
prepares the cache its run then finds (issue 34)."""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import data.cache as cache_mod
from core.errors import ConfigError
from data.nifti import save_volume

N_VOLUMES = 8


def _volume(seed: int, shape=(14, 12, 10)) -> np.ndarray:
    """A small MRI-like head: an ellipsoid of tissue with noise; the seed makes each file's bytes its own."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)  # [X, Y, Z, 3]
    centre, radii = np.array(shape) / 2 - 0.5, np.array(shape) / 2 - 1.5
    inside = (((g - centre) / radii) ** 2).sum(-1) <= 1
    return np.where(inside, 100 + rng.normal(0, 5, shape), 0).astype(np.float32)


def _cohort(folder, n=N_VOLUMES) -> pd.DataFrame:
    """n tiny unlabelled volumes at 2 mm and the manifest of them (folder/manifest.csv)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"v{i:02d}.nii.gz"
        save_volume(path, _volume(i), np.diag([2.0, 2.0, 2.0, 1.0]))
        rows.append({"subject_id": f"v{i:02d}", "image": str(path)})
    df = pd.DataFrame(rows)
    df.to_csv(folder / "manifest.csv", index=False)
    return df


def _entries(cache) -> set[str]:
    """Keys of the complete, readable entries in a cache."""
    keys = {p.parent.name for p in cache.rglob("meta.json") if not p.parent.name.startswith(".")}
    return {k for k in keys if cache_mod.lookup(cache, k) is not None}


# ---- the cache under concurrent writers --------------------------------------------------------

def test_a_writer_that_loses_the_race_keeps_the_winners_whole_entry(tmp_path, monkeypatch):
    """Two writers of one entry (two ranks, two --shard jobs): the second one's move into place finds the
    first one's entry already there. It ends with one valid entry and no error."""
    image = np.ones((1, 3, 3, 3), np.float32)
    final = cache_mod.entry_dir(tmp_path, "ab" * 32)
    real_replace = os.replace
    raced = []

    def replace(src, dst):
        # the other writer finishes the same entry between this writer's check and its move
        if str(dst) == str(final) and not raced:
            raced.append(True)
            cache_mod.write_entry(tmp_path, "ab" * 32, image, None, {"shape": [3, 3, 3], "by": "other"})
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    cache_mod.write_entry(tmp_path, "ab" * 32, image, None, {"shape": [3, 3, 3], "by": "this"})
    assert raced
    assert _entries(tmp_path) == {"ab" * 32}
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_hash_memos_of_two_shards_are_both_kept(tmp_path):
    """Two shards save their digests side by side; neither replaces the other's, and a later index
    (any shard, or none) finds both without hashing again."""
    files = []
    for name in ("a", "b"):
        f = tmp_path / f"{name}.bin"
        f.write_bytes(name.encode() * 100)
        os.utime(f, ns=(10 ** 18, 10 ** 18))  # an old file: its digest is memoised
        files.append(f)
    cache = tmp_path / "cache"
    for part, f in zip(("0of2", "1of2"), files):
        index = cache_mod.HashIndex(cache, part=part)
        index.digest(f)
        index.save()
    later = cache_mod.HashIndex(cache)
    later_hash = cache_mod.file_digest
    calls = []
    cache_mod.file_digest = lambda p: calls.append(p) or later_hash(p)
    try:
        assert [later.digest(f) for f in files] == [later_hash(f) for f in files]
    finally:
        cache_mod.file_digest = later_hash
    assert calls == []


# ---- python -m data.prepare --shard I/N ----------------------------------------------------------

def _prepare(capsys, *args) -> str:
    import data.prepare as prep
    assert prep.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_two_shards_fill_exactly_the_cache_one_prepare_fills(tmp_path, capsys):
    """--shard 0/2 then --shard 1/2 (each spelling of --skip_bad once) fill the entries a single
    data.prepare fills; the index appears only when the last shard is done, equal to the single run's,
    with the bad volume rejected in both; a rerun over the complete cache prepares nothing."""
    df = _cohort(tmp_path / "cohort")
    save_volume(tmp_path / "cohort" / "flat.nii.gz", np.full((14, 12, 10), 5.0, np.float32), np.diag([2.0] * 3 + [1]))
    df = pd.concat([df, pd.DataFrame([{"subject_id": "flat", "image": str(tmp_path / "cohort" / "flat.nii.gz")}])])
    df.to_csv(tmp_path / "cohort" / "manifest.csv", index=False)
    manifest = tmp_path / "cohort" / "manifest.csv"
    one, two = tmp_path / "one", tmp_path / "two"
    out = _prepare(capsys, "--manifest", manifest, "--cache", one, "--skip_bad")
    assert f"data: {N_VOLUMES + 1} volumes: {N_VOLUMES} prepared, 0 from cache, 1 failed" in out

    out = _prepare(capsys, "--manifest", manifest, "--cache", two, "--shard", "0/2", "--skip_bad")
    assert "data: 5 volumes: 4 prepared, 0 from cache, 1 failed" in out  # rows 0, 2, 4, 6 and 8 (flat)
    assert not (two / "index-manifest.csv").exists()  # shard 1 is not done yet
    assert 0 < len(_entries(two)) < N_VOLUMES
    out = _prepare(capsys, "--manifest", manifest, "--cache", two, "--shard", "1/2", "--skip-bad")
    assert "data: 4 volumes: 4 prepared, 0 from cache, 0 failed" in out  # rows 1, 3, 5, 7
    assert _entries(two) == _entries(one) and len(_entries(one)) == N_VOLUMES
    a, b = (pd.read_csv(c / "index-manifest.csv") for c in (one, two))
    for col in ("cache_image", "cache_mask"):
        a[col], b[col] = (t[col].astype(str).str.replace(str(c), "", regex=False) for t, c in ((a, one), (b, two)))
    pd.testing.assert_frame_equal(a, b)
    assert list(pd.read_csv(two / "rejected-manifest.csv")["subject_id"]) == ["flat"]

    out = _prepare(capsys, "--manifest", manifest, "--cache", two, "--skip_bad")
    assert f"0 prepared, {N_VOLUMES} from cache, 1 failed" in out


@pytest.mark.parametrize("text", ["2/2", "1", "a/2", "-1/2", "0/0"])
def test_a_bad_shard_names_the_flag(text):
    from data.shard import parse_shard
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)


# ---- processes at once, and a process killed mid-entry -------------------------------------------

def _prepare_in_child(df, cache, start=None, slow_meta_s=0.0):
    """prepare_table in a forked process (the modules are already imported), after `start` (a barrier);
    with slow_meta_s, each entry waits that long between its arrays and its meta.json."""
    import time

    from data.prep_config import PrepConfig
    from data.prepare import prepare_table
    if slow_meta_s:
        real = cache_mod.write_json

        def slow(path, obj):
            if path.name == "meta.json":
                time.sleep(slow_meta_s)
            real(path, obj)
        cache_mod.write_json = slow
    if start is not None:
        start.wait()
    prepare_table(df, PrepConfig(), cache, require_lesion=False, progress=False)


def _half_entries(cache) -> list:
    """Folders that a reader would take for an entry (not a writer's hidden temporary) but lack meta.json."""
    return [d for d in cache.glob("??/*") if d.is_dir() and not d.name.startswith(".") and not (d / "meta.json").is_file()]


def test_two_processes_preparing_the_same_rows_at_once_leave_one_whole_entry_each(tmp_path):
    import multiprocessing as mp
    df = _cohort(tmp_path / "cohort")
    ctx = mp.get_context("fork")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_prepare_in_child, args=(df, tmp_path / "cache", start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(_entries(tmp_path / "cache")) == N_VOLUMES and not _half_entries(tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("??/*"))) == N_VOLUMES  # nothing else is left beside them


def test_a_kill_9_mid_entry_leaves_no_half_entry_and_the_next_run_completes_the_cache(tmp_path):
    import multiprocessing as mp
    import signal
    import time

    from data.prep_config import PrepConfig
    from data.prepare import prepare_rows
    df = _cohort(tmp_path / "cohort")
    cache = tmp_path / "cache"
    child = mp.get_context("fork").Process(target=_prepare_in_child, args=(df, cache, None, 0.5))
    child.start()
    deadline = time.time() + 120
    # killed once two entries are whole and a third has its arrays written but not its meta.json
    while time.time() < deadline and not (len(_entries(cache)) >= 2 and list(cache.glob("??/.*.tmp/image.npy"))):
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    whole = _entries(cache)
    assert 2 <= len(whole) < N_VOLUMES and not _half_entries(cache)
    done = prepare_rows(df, PrepConfig(), cache, require_lesion=False, progress=False)
    assert not done.errors and len(done.built) == N_VOLUMES - len(whole)  # only the missing ones are built
    assert len(_entries(cache)) == N_VOLUMES and not _half_entries(cache)


# ---- launch/slurm_prepare_array.sh ---------------------------------------------------------------

def test_slurm_array_submits_one_shard_per_task_then_training_after_all(tmp_path):
    """From the login node: one array of SHARDS tasks, then the training job with afterok on the array;
    as an array task: data.prepare --shard I/COUNT with the task's CPUs as workers (fake sbatch/python)."""
    import stat
    import subprocess
    root = Path(__file__).resolve().parents[1]
    script = root / "launch" / "slurm_prepare_array.sh"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in {"sbatch": 'echo "sbatch $*" >> "$LOG"; echo "4242;cluster"',
                       "python": 'echo "python $*" >> "$LOG"'}.items():
        (bin_ / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_ / name).chmod(stat.S_IRWXU)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(log), "SHARDS": "4",
           "TRAIN": "launch/slurm_pretrain.sh --data /d.json --cache_dir /c"}
    env.pop("SLURM_ARRAY_TASK_ID", None)
    prep_args = ["--config", "launch/pretrain_base_gpu.yaml", "--datalist", "/d.json", "--cache", "/c"]
    res = subprocess.run(["bash", str(script), *prep_args], cwd=root, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == [
        f"sbatch --parsable --array=0-3 {script} {' '.join(prep_args)}",
        "sbatch --dependency=afterok:4242 launch/slurm_pretrain.sh --data /d.json --cache_dir /c"]
    log.unlink()
    task = {**env, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_CPUS_PER_TASK": "16"}
    res = subprocess.run(["bash", str(script), *prep_args], cwd=root, env=task, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert log.read_text().split() == ["python", "-m", "data.prepare", "--shard", "2/4", "--workers", "16", *prep_args]


# ---- data.prepare --config <a stage's YAML> (issue 34) -------------------------------------------

def _labelled_cohort(folder, n=4) -> Path:
    """n tiny volumes, each with a lesion mask and a label: a fine-tuning manifest."""
    df = _cohort(folder, n)
    for i, row in df.iterrows():
        mask = np.zeros((14, 12, 10), np.float32)
        mask[5:8, 5:8, 4:6] = 1
        save_volume(folder / f"v{i:02d}_mask.nii.gz", mask, np.diag([2.0, 2.0, 2.0, 1.0]))
        df.loc[i, "mask"] = str(folder / f"v{i:02d}_mask.nii.gz")
    df["label"] = [i % 2 for i in range(n)]
    df["age"] = [50.0 + i for i in range(n)]  # a clinical column, which the YAML's fusion reads
    df.to_csv(folder / "manifest.csv", index=False)
    return Path(folder) / "manifest.csv"


def test_prepare_with_a_stage_yaml_writes_the_entries_its_fine_tuning_finds(tmp_path, capsys, monkeypatch):
    """data.prepare --config launch/finetune_tiny_cpu.yaml reads the YAML's prep: section and prints the key;
    fine-tuning with that YAML then finds every entry (building one would fail here). Flags still win."""
    import data.prepare as prep
    from core.config import load_config
    from data.prep_config import PrepConfig
    from finetune.config import FinetuneConfig
    from finetune.train import resolve_inputs
    yaml = Path(__file__).resolve().parents[1] / "launch" / "finetune_tiny_cpu.yaml"
    manifest, cache = _labelled_cohort(tmp_path / "cohort"), tmp_path / "cache"
    cfg = load_config(FinetuneConfig, yaml)
    cfg.manifest, cfg.cache_dir, cfg.output_dir = str(manifest), str(cache), str(tmp_path / "run")
    _, spec = resolve_inputs(cfg)
    out = _prepare(capsys, "--config", yaml, "--manifest", manifest, "--cache", cache)
    assert f"preprocessing key {spec.prep.key()}" in out and "4 prepared" in out

    def no_second_preparation(*a, **k):
        raise AssertionError("fine-tuning prepared a volume that data.prepare had prepared")
    monkeypatch.setattr(prep, "build_entry", no_second_preparation)
    from finetune.train import load_cohort
    df, _, _ = load_cohort(cfg, spec.prep, show_progress=False)
    assert len(df) == 4 and all(Path(p).is_file() for p in df["cache_image"])

    monkeypatch.undo()
    out = _prepare(capsys, "--config", yaml, "--manifest", manifest, "--cache", cache, "--spacing", "3", "3", "3")
    assert f"preprocessing key {PrepConfig(spacing=(3.0, 3.0, 3.0)).key()}" in out


# ---- ranks of a run ------------------------------------------------------------------------------

def _as_two_ranks(fn, wait_s: float = 120) -> list:
    """fn(shard, gather) on two threads standing for two ranks, meeting in a gather; their results (a value or
    the exception raised). A rank that never reaches the gather leaves the other one stuck there until `wait_s`
    (threading.BrokenBarrierError, as the process group's timeout would stop it); tests/
    test_data_robustness_s3_gather.py uses this harness too."""
    import threading

    from data.shard import Shard
    shares, results, meet = [None, None], [None, None], threading.Barrier(2, timeout=wait_s)

    def gather(payload, rank):
        shares[rank] = payload
        meet.wait()
        return shares[0] + shares[1]

    def rank(r):
        try:
            results[r] = fn(Shard(r, 2, show=False), lambda payload: gather(payload, r))
        except Exception as e:  # noqa: BLE001 - handed to the test
            results[r] = e
            if not isinstance(e, threading.BrokenBarrierError) and shares[r] is None:
                meet.abort()  # this rank left before the gather: the other one's wait breaks (test time only)
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * wait_s)
    return results


def test_each_rank_prepares_its_share_and_every_rank_gets_the_whole_table(tmp_path, capsys):
    from data.prep_config import PrepConfig
    from data.shard import prepare_shared
    df = _cohort(tmp_path / "cohort")
    a, b = _as_two_ranks(lambda shard, gather: prepare_shared(df, PrepConfig(), tmp_path / "cache", shard=shard,
                                                                gather=gather, workers=1)[0])
    pd.testing.assert_frame_equal(a, b)
    assert list(a["subject_id"]) == list(df["subject_id"]) and len(_entries(tmp_path / "cache")) == N_VOLUMES
    assert f"data: {N_VOLUMES} volumes: {N_VOLUMES} prepared (4 + 4 on 2 ranks), 0 from cache, 0 failed" in \
        capsys.readouterr().out


def test_a_bad_volume_in_one_ranks_share_stops_every_rank_after_the_gather(tmp_path):
    """No rank is left waiting for one that raised: both raise the table's first bad row, naming its file."""
    from core.errors import NiftiError
    from data.prep_config import PrepConfig
    from data.shard import prepare_shared
    df = _cohort(tmp_path / "cohort", 4)
    save_volume(tmp_path / "flat.nii.gz", np.full((14, 12, 10), 5.0, np.float32), np.diag([2.0] * 3 + [1]))
    df.loc[1, "image"] = str(tmp_path / "flat.nii.gz")  # rank 1's share
    results = _as_two_ranks(lambda shard, gather: prepare_shared(df, PrepConfig(), tmp_path / "cache", shard=shard,
                                                                   gather=gather, workers=1))
    assert all(isinstance(r, NiftiError) and "flat.nii.gz" in str(r) for r in results), results


def test_a_share_measured_to_outlast_the_timeout_is_said_up_front(tmp_path, capsys, monkeypatch):
    import time

    import data.prepare as prep
    from data.prep_config import PrepConfig
    from data.shard import prepare_shared
    real = prep.build_entry
    monkeypatch.setattr(prep, "build_entry", lambda *a, **k: time.sleep(0.2) or real(*a, **k))
    prepare_shared(_cohort(tmp_path / "cohort", 4), PrepConfig(), tmp_path / "cache", workers=1, timeout_s=0.3)
    err = capsys.readouterr().err
    assert "3 volumes left to prepare" in err and "past the process group's timeout" in err
    assert "--dist_timeout_min" in err and "data.prepare --shard" in err


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLOW_PRETRAIN = """import os, runpy, time
import data.prepare as prep
real = prep.build_entry
def slow(*a, **k):  # a volume that takes SLOW_PREP_S to prepare
    time.sleep(float(os.environ["SLOW_PREP_S"]))
    return real(*a, **k)
prep.build_entry = slow
runpy.run_module("pretrain", run_name="__main__")
"""


def test_two_ranks_prepare_half_each_within_a_timeout_a_serial_preparation_outlasts_then_resume(tmp_path):
    """2 CPU ranks, an empty cache, 8 volumes of 3 s each (by a wrapper), a process-group timeout of 12 s:
    one rank preparing all 8 (24 s) would leave the other waiting past it. Each rank prepares 4, the run
    trains; its resume finds the cache complete and prepares nothing."""
    import json
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    _cohort(tmp_path / "volumes")
    (tmp_path / "volumes" / "manifest.csv").unlink()  # a folder of NIfTIs
    script = tmp_path / "slow_pretrain.py"
    script.write_text(SLOW_PRETRAIN)
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root),
           "SLOW_PREP_S": "3"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           str(script), "--config", str(root / "launch" / "pretrain_tiny_cpu.yaml"),
           "--data", str(tmp_path / "volumes"), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
           "--max_steps", "2", "--ckpt_every", "2", "--batch_size", "1", "--crops_per_volume", "1",
           "--crop_size", "48", "--lesion_view_fraction", "0", "--preview_every", "0", "--mixed_precision", "no",
           "--dist_timeout_min", "0.2", "--prep_workers", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data: 8 volumes: 8 prepared (4 + 4 on 2 ranks), 0 from cache, 0 failed" in res.stdout
    assert json.loads((out / "checkpoints" / "ckpt-0000002" / "summary.json").read_text())["world_size"] == 2
    cmd[cmd.index("--max_steps") + 1] = "3"
    res = subprocess.run(cmd + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "data: 8 volumes: 0 prepared (0 + 0 on 2 ranks), 8 from cache" in res.stdout
    assert json.loads((out / "checkpoints" / "ckpt-0000003" / "summary.json").read_text())["step"] == 3


def test_shards_prepared_with_the_pretraining_yaml_leave_pretraining_nothing_to_prepare(tmp_path, capsys,
                                                                                      monkeypatch):
    """data.prepare --config launch/pretrain_tiny_cpu.yaml --shard I/2 over a folder, then pretraining's own
    loading of that folder with that YAML builds nothing: both use one preprocessing key."""
    import data.prepare as prep
    from core.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.train import load_training_volumes
    yaml = Path(__file__).resolve().parents[1] / "launch" / "pretrain_tiny_cpu.yaml"
    folder = tmp_path / "volumes"
    _cohort(folder, 4)
    (folder / "manifest.csv").unlink()
    for shard in ("0/2", "1/2"):
        _prepare(capsys, "--config", yaml, "--folder", folder, "--cache", tmp_path / "cache", "--shard", shard)
    monkeypatch.setattr(prep, "build_entry", lambda *a, **k: pytest.fail("pretraining prepared a volume again"))
    cfg = load_config(PretrainConfig, yaml)
    cfg.data, cfg.cache_dir, cfg.lesion_view_fraction = str(folder), str(tmp_path / "cache"), 0.0
    dataset, subjects = load_training_volumes(cfg, show_progress=False)
    assert len(subjects) == 4 and "data: 4 volumes: 0 prepared, 4 from cache" in capsys.readouterr().out


def test_startup_benchmark_tables_each_phase_per_row(tmp_path):
    """benchmarks.speed.startup at a toy size: every phase timed for each row count, and the dataset's
    memory per row, from a warm cache."""
    from benchmarks.speed import startup
    text = startup.main(["--rows", "12", "24", "--files", "3", "--size", "16", "--out", str(tmp_path),
                         "--skip_import"])
    lines = text.splitlines()
    assert lines[0].count("rows") == 2 and len(lines) == 2 + 7
    assert any(line.startswith("| hash + cache lookup |") for line in lines)
    assert len(list((tmp_path / "rows24").iterdir())) == 24 and len(_entries(tmp_path / "cache")) == 3


def test_dist_timeout_min_is_the_process_groups_timeout(monkeypatch):
    """make_accelerator hands accelerate one InitProcessGroupKwargs with --dist_timeout_min (and gloo for
    launched ranks on a host with no GPU); a timeout that is not positive names the flag."""
    from datetime import timedelta

    import engine.distributed as dist
    from engine.config import LoopConfig
    seen = {}
    monkeypatch.setattr(dist, "Accelerator", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.make_accelerator(LoopConfig(mixed_precision="no"), timeout_min=0.2)
    (group,) = seen["kwargs_handlers"]
    assert group.timeout == timedelta(seconds=12) and group.backend == "gloo"
    with pytest.raises(ConfigError, match="--dist_timeout_min"):
        dist.make_accelerator(LoopConfig(mixed_precision="no"), timeout_min=0)

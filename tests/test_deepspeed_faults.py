"""Faults under DeepSpeed on 2 CPU ranks over gloo, through the shipped configs.

- A non-finite loss at a gradient-accumulation boundary micro-batch and at a non-boundary one: the
  spoiled optimizer step changes nothing, and the next good step is the one a run that never saw the bad
  micro-batch takes (issue 32, defect 8).
- kill -9 at a seeded random moment of a ZeRO-2 run (the whole job, mid-step) and of a ZeRO-3 run (one
  rank alone, mid-checkpoint), then `--resume auto`: the final checkpoint and the loss curve equal
  an uninterrupted run's, bit for bit (issue 32, fault tests).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import ds_nonfinite_script as plan
from test_deepspeed import ROOT, command, launch


def _reference() -> list[dict[str, torch.Tensor]]:
    """PLAN's good steps on plain torch, one process: the gradient of the mean loss over both ranks' and
    both micro-batches' data, clipped by its global norm, then AdamW; weights and moments after each."""
    model = plan.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=plan.LR, betas=plan.BETAS, weight_decay=plan.WD)
    out = []
    for ids, bad in plan.PLAN:
        if bad is not None:
            continue
        opt.zero_grad()
        losses = [plan.loss_of(model, *plan.micro_batch(d, r)) for d in ids for r in (0, 1)]
        torch.stack(losses).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), plan.CLIP)
        opt.step()
        row = {f"w/{k}": v.detach().clone() for k, v in model.state_dict().items()}
        for k, p in model.named_parameters():
            row.update({f"{key}/{k}": opt.state[p][key].clone() for key in ("exp_avg", "exp_avg_sq")})
        out.append(row)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_nonfinite_micro_batch_skips_the_whole_step_under_zero(stage, tmp_path):
    launch(f"deepspeed_zero{stage}", str(ROOT / "tests" / "ds_nonfinite_script.py"), str(tmp_path))
    info = json.loads((tmp_path / "steps.json").read_text())
    assert info["world_size"] == info["num_processes"] == 2 and info["zero_stage"] == stage
    assert info["distributed_type"].endswith("DEEPSPEED") and info["grad_accum"] == 2
    got = load_file(str(tmp_path / "steps.safetensors"))
    step = [{k.split("/", 1)[1]: v for k, v in got.items() if k.startswith(f"{i}/")} for i in range(len(plan.PLAN))]
    ref = _reference()
    # Steps 1 (NaN in the boundary micro-batch) and 3 (NaN in the first) change neither the weights nor
    # AdamW's moments, bit for bit ...
    for spoiled in (1, 3):
        assert step[spoiled].keys() == step[spoiled - 1].keys()
        assert [k for k in step[spoiled] if not torch.equal(step[spoiled][k], step[spoiled - 1][k])] == []
    # ... and each good step is the step of a run without the bad one: no gradient leaks across steps.
    # Only the order of fp32 reductions differs from plain torch.
    for i, r in zip((0, 2, 4), ref):
        assert step[i].keys() == r.keys()
        for k in r:
            torch.testing.assert_close(step[i][k], r[k], rtol=1e-5, atol=1e-6, msg=f"step {i}: {k}")
    for rows in info["ranks"]:  # every rank: the same verdicts, and AdamW counts only the steps taken
        assert [r["step_ok"] for r in rows] == [True, False, True, False, True]
        assert [r["adam_steps"] for r in rows] == [[1], [1], [2], [2], [3]]
        assert [r["ds_skipped"] for r in rows] == [False, True, False, True, False]


# --- kill -9, then --resume auto ---------------------------------------------------------------------------

STEPS, EVERY = 8, 2  # 4 checkpoints (the preset keeps 2); each run is mostly start-up


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """Two unlabelled volumes (one per rank) and a cache that every run of this module shares."""
    root = tmp_path_factory.mktemp("kill")
    subprocess.run([sys.executable, "-m", "data.synth", "--out", str(root / "cohort"), "--n_unlabeled", "2",
                    "--n_labeled", "0", "--n_external", "0", "--no_progress"], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return root


def _pretrain_cmd(stage: int, root: Path, out: Path, *extra: str) -> tuple[list[str], dict]:
    return command(f"deepspeed_zero{stage}", "-m", "pretrain", "--config", "launch/pretrain_tiny_cpu.yaml",
                   "--data", str(root / "cohort" / "unlabeled"), "--cache_dir", str(root / "cache"),
                   "--output_dir", str(out), "--crop_size", "64", "--batch_size", "1", "--crops_per_volume", "1",
                   "--preview_every", "0", "--log_every", "1", "--report_to", "none",
                   "--max_steps", str(STEPS), "--ckpt_every", str(EVERY), *extra)


def _logged_steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").is_file():
        return []
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a row being appended right now
            pass
    return steps


def _reached(run: Path, step: int, phase: str) -> bool:
    """Has the run reached the moment: step `step` logged ("step"), or its checkpoint being written ("save";
    also once that checkpoint is done, in case the save fell between two polls)."""
    done = any(s >= step for s in _logged_steps(run))
    if phase == "step":
        return done
    ckpts = run / "checkpoints"
    return (ckpts / f".tmp-ckpt-{step:07d}").exists() or (ckpts / f"ckpt-{step:07d}").exists() or \
        any(s > step for s in _logged_steps(run))


def _latest(run: Path) -> Path | None:
    done = sorted(p for p in (run / "checkpoints").glob("ckpt-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def _run_and_kill(cmd, env, run: Path, step: int, phase: str, delay: float, who: str, log: Path) -> None:
    """Start the run, wait for the moment, SIGKILL `who` ("all": the launcher and both ranks, as when a node
    is lost; "rank0" / "rank1": that rank alone, as the OOM killer does, and the launcher must then end
    the job by itself), and make sure nothing of it is left running."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    ranks: list[psutil.Process] = []
    try:
        t0 = time.monotonic()
        while not _reached(run, step, phase):
            assert proc.poll() is None, f"the run ended before step {step} ({phase}): {log.read_text()[-3000:]}"
            assert time.monotonic() - t0 < 600
            time.sleep(0.01)
        time.sleep(delay)
        launcher = psutil.Process(proc.pid)
        ranks = [p for p in launcher.children() if "RANK" in p.environ()]  # torchrun's workers
        assert len(ranks) == 2, ranks
        for p in [launcher, *ranks] if who == "all" else [p for p in ranks if p.environ()["RANK"] == who[-1]]:
            p.send_signal(signal.SIGKILL)  # psutil first checks that the pid is still that process
        assert proc.wait(timeout=180) != 0  # one rank's death ends the whole job, never hangs it
    finally:  # nothing of this run outlives the test, whatever failed
        if proc.poll() is None:
            ranks += psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            proc.wait()
        for p in ranks:
            if p.is_running():
                p.kill()
        psutil.wait_procs(ranks, timeout=30)


def _kill_plan(stage: int) -> list[tuple[int, str, float, str]]:
    """One seeded kill moment (step, phase, delay s, whom) per stage, so that the two stages together cover
    both kinds of death and both phases at the cost of one launch each: ZeRO-2 loses the whole job
    mid-step (a lost node), ZeRO-3 one rank alone in a checkpoint's write (the OOM killer)."""
    rng = random.Random(f"issue32-kill-zero{stage}")
    phase, who = ("step", "all") if stage == 2 else ("save", "rank1")
    step = rng.randint(EVERY + 1, STEPS - 2)  # after the first checkpoint, so that the resumed part resumes
    step += step % EVERY if phase == "save" else 0  # "save" kills in a checkpoint's write
    return [(step, phase, rng.uniform(0, 0.3), who)]


@pytest.mark.parametrize("stage", [2, 3])
def test_kill9_at_random_moments_then_resume_equals_uninterrupted(small_cohort, stage):
    full, cut = small_cohort / f"zero{stage}_full", small_cohort / f"zero{stage}_cut"
    cmd, env = _pretrain_cmd(stage, small_cohort, full)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
    for i, (step, phase, delay, who) in enumerate(_kill_plan(stage)):
        cmd, env = _pretrain_cmd(stage, small_cohort, cut, *(("--resume", "auto") if i else ()))
        _run_and_kill(cmd, env, cut, step, phase, delay, who, small_cohort / f"zero{stage}_kill{i}.log")
    assert _latest(cut) is not None and not (cut / "encoder").exists()
    latest = _latest(cut)
    cmd, env = _pretrain_cmd(stage, small_cohort, cut, "--resume", "auto")
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resumed from {latest}" in res.stdout  # the newest complete checkpoint the kills left
    a, b = (load_file(str(r / "checkpoints" / f"ckpt-{STEPS:07d}" / "weights.safetensors")) for r in (full, cut))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []  # bit for bit
    losses = [[json.loads(line)["train/loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (full, cut)]
    assert losses[0] == losses[1] and _logged_steps(cut) == list(range(1, STEPS + 1))
    assert not list((cut / "checkpoints").glob(".tmp-*")) and (cut / "encoder").is_dir()

"""The 2-rank DeepSpeed / DDP pretraining runs that tests/test_deepspeed.py and tests/test_deepspeed_faults.py
compare, each launched once per test session (the `ds_runs` fixture in tests/conftest.py); not a test module.

Every run is `accelerate launch --config_file launch/accelerate/deepspeed_zero{2,3}.yaml --num_processes 2`
(or the CPU DDP recipe) of `-m pretrain` with one configuration: STEPS optimizer steps, a checkpoint every
EVERY. Per config there is one uninterrupted run, and per ZeRO stage one interrupted chain of the same
configuration: stopped cleanly at half (--stop_at), resumed and killed with SIGKILL at a seeded moment of its
resumed part, resumed again to the end. The tests hold each run and the chain's end to the uninterrupted run.
"""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 20, 5  # 4 checkpoints, of which the preset keeps 2: the chain resumes across a rotation
HALF = STEPS // 2  # where the chain stops cleanly: a checkpoint step


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    # Unbuffered: what a rank printed before a SIGKILL is in its log.
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def command(config: str, *args: str, processes: int = 2, tee: bool = False) -> tuple[list[str], dict]:
    """(argv, env) of `accelerate launch` with a shipped config; config "ddp" is the CPU DDP recipe. `tee`
    prefixes each rank's lines with `[default<rank>]:` (torchrun's --tee), so a failure names its rank."""
    env, cmd = run_env(), [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                        "--main_process_port", _port(), *(("--tee", "3") if tee else ())]
    if config == "ddp":  # launch/cpu_two_process.sh
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no"]
    else:
        cmd += ["--config_file", f"launch/accelerate/{config}.yaml"]
    return cmd + list(args), env


# The CLI's one-line errors, exceptions, and the launcher's verdicts on its workers (exit codes, signals).
ERROR_LINE = re.compile(r"^error: |^(\w+\.)*\w*(Error|Exception)\b|exitcode|Signal \d+|Killed")


def failure_digest(output: str, tail: int = 6) -> str:
    """Per rank of a --tee'd launch, its first and last error lines and its last `tail` lines, then the
    launcher's own last lines: one rank's long traceback no longer pushes the other rank's error out of the
    message."""
    ranks: dict[str, list[str]] = {}
    for line in output.splitlines():
        tag = re.match(r"\[(default\d+)\]:", line)
        ranks.setdefault(tag.group(1) if tag else "launcher", []).append(line[tag.end():] if tag else line)
    parts = []
    for who, lines in sorted(ranks.items()):
        errors = [line for line in lines if ERROR_LINE.search(line)]
        head = [f"first error: {errors[0]}", f"last error: {errors[-1]}"] if errors else ["no error line"]
        parts.append("\n".join([f"--- {who}: {len(lines)} lines", *head, *lines[-tail:]]))
    return "\n".join(parts)


def run_to_end(cmd: list[str], env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    """Run a launch to its end; its exit status must say `ok`. A tee'd launch's failure shows each rank's
    errors, an untee'd one's the end of its stderr."""
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert (res.returncode == 0) == ok, \
        failure_digest(res.stdout + res.stderr) if "--tee" in cmd else res.stderr[-4000:]
    return res


def launch(config: str, *args: str, processes: int = 2, ok: bool = True, tee: bool = False
           ) -> subprocess.CompletedProcess:
    """`accelerate launch` with a shipped config, run to its end."""
    return run_to_end(*command(config, *args, processes=processes, tee=tee), ok=ok)


def pretrain_command(config: str, cohort: Path, out: Path, *extra: str, processes: int = 2, tee: bool = True
                     ) -> tuple[list[str], dict]:
    """The one pretraining configuration every run here shares; the cache is shared too (content-addressed)."""
    return command(config, "-m", "pretrain", "--config", "launch/pretrain_tiny_cpu.yaml",
                   "--data", str(cohort / "unlabeled"), "--cache_dir", str(out.parent / "cache"),
                   "--output_dir", str(out), "--crop_size", "64", "--batch_size", "1", "--crops_per_volume", "1",
                   "--preview_every", "0", "--log_every", "1", "--report_to", "none", "--max_steps", str(STEPS),
                   "--ckpt_every", str(EVERY), *extra, processes=processes, tee=tee)


def logged_steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").is_file():
        return []
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a row being appended right now
            pass
    return steps


def losses(run: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, step: int = STEPS) -> dict:
    return load_file(str(run / "checkpoints" / f"ckpt-{step:07d}" / "weights.safetensors"))


def latest(run: Path) -> Path | None:
    done = sorted(p for p in (run / "checkpoints").glob("ckpt-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


@dataclass(frozen=True)
class Kill:
    """A moment of a run (step `step` logged: "step"; its checkpoint being written: "save"), a delay after it,
    and whom SIGKILL hits ("all": the launcher and both ranks, as when a node is lost; "rank0" / "rank1":
    that rank alone, as the OOM killer does, and the launcher must then end the job by itself)."""
    step: int
    phase: str
    delay: float
    who: str


def kill_plan(stage: int) -> Kill:
    """One seeded kill moment per stage in the chain's resumed part, so that the two stages together cover
    both kinds of death and both phases at the cost of one launch each: ZeRO-2 loses the whole job mid-step,
    ZeRO-3 one rank alone in a checkpoint's write (the next one due, before the last)."""
    rng = random.Random(f"issue32-kill-zero{stage}")
    phase, who = ("step", "all") if stage == 2 else ("save", "rank1")
    step = rng.randint(HALF + 1, STEPS - 2)
    if phase == "save":
        step = min(-(-step // EVERY) * EVERY, STEPS - EVERY)
    return Kill(step, phase, rng.uniform(0, 0.3), who)


def _reached(run: Path, kill: Kill) -> bool:
    """Has the run reached the kill's moment (for "save", also once that checkpoint is done, in case the
    save fell between two polls)?"""
    steps = logged_steps(run)
    if kill.phase == "step":
        return any(s >= kill.step for s in steps)
    ckpts = run / "checkpoints"
    return (ckpts / f".tmp-ckpt-{kill.step:07d}").exists() or (ckpts / f"ckpt-{kill.step:07d}").exists() or \
        any(s > kill.step for s in steps)


def run_and_kill(cmd: list[str], env: dict, run: Path, kill: Kill, log: Path) -> None:
    """Start the run, wait for the kill's moment, SIGKILL whom it names, and make sure that nothing of the
    run is left running; one rank's death must end the whole job, never hang it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    ranks: list[psutil.Process] = []
    try:
        t0 = time.monotonic()
        while not _reached(run, kill):
            assert proc.poll() is None, \
                f"the run ended before step {kill.step} ({kill.phase}):\n{failure_digest(log.read_text())}"
            assert time.monotonic() - t0 < 600
            time.sleep(0.01)
        time.sleep(kill.delay)
        launcher = psutil.Process(proc.pid)
        ranks = [p for p in launcher.children() if "RANK" in p.environ()]  # torchrun's workers
        assert len(ranks) == 2, ranks
        for p in [launcher, *ranks] if kill.who == "all" else [p for p in ranks if p.environ()["RANK"] == kill.who[-1]]:
            p.send_signal(signal.SIGKILL)  # psutil first checks that the pid is still that process
        assert proc.wait(timeout=180) != 0
    finally:  # nothing of this run outlives the test, whatever failed
        if proc.poll() is None:
            ranks += psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            proc.wait()
        for p in ranks:
            if p.is_running():
                p.kill()
        psutil.wait_procs(ranks, timeout=30)


@dataclass(frozen=True)
class Chain:
    """A ZeRO run stopped at HALF, resumed and killed, resumed to the end; what each part left behind."""
    run: Path
    encoder_after_stop: bool  # the clean stop at half exported nothing
    killed_log: str  # the killed part's output (tee'd, unbuffered): its "resumed from" line included
    kill: Kill
    latest_before_resume: Path | None  # the newest complete checkpoint the kill left
    encoder_before_resume: bool
    resumed: subprocess.CompletedProcess  # the last part, run to the end


class ReferenceRuns:
    """Each run launched on first request and kept for the session; a failed launch fails every test that
    asks for it again with the same error, without launching it again."""

    def __init__(self, root: Path, cohort: Path):
        self.root, self.cohort = root, cohort
        self._done: dict[str, object] = {}

    def _once(self, key: str, make):
        if key not in self._done:
            try:
                self._done[key] = make()
            except Exception as e:  # kept, and raised again to the next test asking
                self._done[key] = e
        if isinstance(self._done[key], Exception):
            raise self._done[key]
        return self._done[key]

    def full(self, config: str) -> Path:
        """The uninterrupted run of `config` ("ddp", "deepspeed_zero2", "deepspeed_zero3")."""
        def make() -> Path:
            out = self.root / f"{config}_full"
            run_to_end(*pretrain_command(config, self.cohort, out))
            return out
        return self._once(config, make)

    def chain(self, stage: int) -> Chain:
        return self._once(f"chain{stage}", lambda: self._chain(stage))

    def _chain(self, stage: int) -> Chain:
        config, cut, kill = f"deepspeed_zero{stage}", self.root / f"zero{stage}_chain", kill_plan(stage)
        run_to_end(*pretrain_command(config, self.cohort, cut, "--stop_at", str(HALF)))
        encoder_after_stop = (cut / "encoder").exists()
        log = self.root / f"zero{stage}_killed.log"
        run_and_kill(*pretrain_command(config, self.cohort, cut, "--resume", "auto"), cut, kill, log)
        before, encoder_before = latest(cut), (cut / "encoder").exists()
        resumed = run_to_end(*pretrain_command(config, self.cohort, cut, "--resume", "auto"))
        return Chain(cut, encoder_after_stop, log.read_text(), kill, before, encoder_before, resumed)


"""Shared helpers for the speed benchmarks: timing, peak memory, machine description, FLOPs, tables, docs.

Timing. `measure` builds one "runner" per contender (any object with `step() -> {"step": s, ...}`,
`info() -> dict` and `memory() -> dict`), warms each up, then times `repeats` steps. On a shared CPU
the contenders run in separate processes and are timed round-robin (one step of each per round), so a
burst of load from other jobs hits all of them alike and per-round ratios stay meaningful; each
process's `ru_maxrss` is then that contender's own peak memory. On a GPU they run one after another in
this process, each with freshly reset `torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.atomic import write_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# --- machine -------------------------------------------------------------------------------------------

def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine(device: str) -> str:
    """One line: cores and CPU model, GPU when used, and library versions."""
    import monai
    import timm
    parts = [f"{os.cpu_count()} cores (`nproc`), {cpu_model()}"]
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts.append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    parts.append(f"torch {torch.__version__}, timm {timm.__version__}, monai {monai.__version__}, "
                 f"Python {platform.python_version()}")
    return "; ".join(parts)


def peak_bf16_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def load_average() -> float:
    return os.getloadavg()[0]


def add_run_args(p: argparse.ArgumentParser, rows: str = "row") -> None:
    """The flags every speed benchmark takes: device, timing, threads, isolation, docs, quiet."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=5, help=f"timed steps per {rows}; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help=f"untimed steps per {rows} first")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help=f"CPU: each {rows} in its own process (clean peak RSS)")
    p.add_argument("--write-docs", action="store_true", help="put the table in docs/BENCHMARKS.md")
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--quiet", action="store_true")


def resolve_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    return name


# --- time and memory -----------------------------------------------------------------------------------

def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def current_rss_mib() -> float:
    """Resident set size of this process now."""
    with contextlib.suppress(OSError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return float("nan")


def reset_peak_memory(device: str) -> None:
    """On CUDA the peak restarts from now; a process's CPU peak (ru_maxrss) cannot be reset."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


class Runner:
    """What every benchmark runner shares: its device, thread count and seed, and the memory baseline
    that `memory()` reports growth against. Subclasses call `start(spec)` once their imports are done."""

    def start(self, spec: dict) -> None:
        self.device = torch.device(spec["device"])
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        torch.manual_seed(spec.get("seed", 0))
        self.idle_mib = current_rss_mib()
        reset_peak_memory(spec["device"])

    def memory(self) -> dict[str, float]:
        idle = float("nan") if self.device.type == "cuda" else self.idle_mib
        return {"peak_mib": peak_memory_mib(str(self.device)), "idle_mib": idle}


def peak_memory_mib(device: str) -> float:
    """CUDA: peak allocated tensor memory since the last reset. CPU: peak RSS of this process (ru_maxrss)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def release_memory(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --- FLOPs ---------------------------------------------------------------------------------------------

def block_flops(tokens: int, dim: int, mlp_dim: int) -> float:
    """Forward FLOPs of one pre-norm transformer block on `tokens` tokens (matmuls only: qkv, scores,
    weighted sum, projection, MLP; 2 FLOPs per multiply-add)."""
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * mlp_dim)
    attention = 2 * 2 * tokens * tokens * dim
    return float(linear + attention)


def mae_forward_flops(*, num_patches: int, visible: int, patch_values: int, dim: int, depth: int, mlp_dim: int,
                      decoder_dim: int, decoder_depth: int, decoder_mlp_dim: int, extra_tokens: int = 0) -> float:
    """Forward FLOPs of a masked autoencoder on one volume: patch embedding of every patch, encoder on the
    visible tokens, decoder on all tokens, prediction layer. `extra_tokens` (MONAI's class token) join both
    sequences. `patch_values` = p^3 * channels."""
    enc_tokens, dec_tokens = visible + extra_tokens, num_patches + extra_tokens
    return float(2 * num_patches * patch_values * dim
                 + depth * block_flops(enc_tokens, dim, mlp_dim)
                 + 2 * enc_tokens * dim * decoder_dim
                 + decoder_depth * block_flops(dec_tokens, decoder_dim, decoder_mlp_dim)
                 + 2 * dec_tokens * decoder_dim * patch_values)


TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward ~ 3x forward (model FLOPs; recomputation is not counted)


def format_flops(flops_per_s: float) -> str:
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.1f} {unit}"
    return f"{flops_per_s / 1e6:.0f} MFLOP/s"


# --- running contenders --------------------------------------------------------------------------------

def _build(target: str, spec: dict):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(spec)


class LocalWorker:
    """A runner in this process."""

    def __init__(self, target: str, spec: dict):
        self.device = spec.get("device", "cpu")
        self._obj = _build(target, spec)

    def wait_ready(self) -> None:
        pass

    def call(self, method: str, *args):
        return getattr(self._obj, method)(*args)

    def close(self) -> None:
        self._obj = None
        release_memory(self.device)


def _serve(conn, target: str, spec: dict) -> None:
    try:
        obj = _build(target, spec)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            return
        method, args = msg
        try:
            conn.send(("ok", getattr(obj, method)(*args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class ProcessWorker:
    """A runner in its own spawned process (a fresh interpreter, so its ru_maxrss is its own)."""

    def __init__(self, target: str, spec: dict):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, target, spec), daemon=True)
        self._proc.start()
        child.close()
        self._ready = False

    def wait_ready(self) -> None:
        """Block until the runner is built (workers are started first, then awaited, so they build in parallel)."""
        if not self._ready:
            self._reply()
            self._ready = True

    def _reply(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"benchmark worker exited with code {self._proc.exitcode}") from None
        if status != "ok":
            raise RuntimeError(f"benchmark worker failed:\n{value}")
        return value

    def call(self, method: str, *args):
        self.wait_ready()
        self._conn.send((method, args))
        return self._reply()

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(None)
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()


@dataclass
class Measured:
    samples: list[dict[str, float]] = field(default_factory=list)  # one per timed step
    info: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)

    def median(self, key: str = "step") -> float:
        return statistics.median(s[key] for s in self.samples)


def measure(contenders: dict[str, tuple[str, dict]], repeats: int, warmup: int, *, isolate: bool,
            interleave: bool, progress: bool = True) -> dict[str, Measured]:
    """Time each contender `(target "module:Class", spec)`: `warmup` untimed steps, then `repeats` timed.

    interleave: all are built first and timed round-robin (on a shared CPU, so load hits all alike);
    otherwise one at a time, each freed before the next is built (on a GPU, so memory peaks are clean).
    isolate: each runs in its own process.
    """
    make = ProcessWorker if isolate else LocalWorker
    out = {name: Measured() for name in contenders}

    def log(msg):
        if progress:
            print(msg, file=sys.stderr, flush=True)

    def finish(name, worker):
        out[name].info = worker.call("info")
        out[name].memory = worker.call("memory")
        worker.close()

    if interleave:
        workers = {}
        try:
            log("building " + ", ".join(contenders))
            for name, (target, spec) in contenders.items():
                workers[name] = make(target, spec)
            for w in workers.values():
                w.wait_ready()
            for name, w in workers.items():
                for _ in range(warmup):
                    w.call("step")
            for r in range(repeats):
                for name, w in workers.items():
                    out[name].samples.append(w.call("step"))
                log(f"round {r + 1}/{repeats}: " + ", ".join(
                    f"{n} {out[n].samples[-1]['step'] * 1e3:.0f} ms" for n in workers))
            for name, w in list(workers.items()):
                finish(name, workers.pop(name))
        finally:
            for w in workers.values():
                w.close()
    else:
        for name, (target, spec) in contenders.items():
            log(f"running {name}")
            w = make(target, spec)
            try:
                for _ in range(warmup):
                    w.call("step")
                out[name].samples = [w.call("step") for _ in range(repeats)]
                finish(name, w)
            finally:
                w.close()
    return out


def paired_ratio(ours: Measured, ref: Measured, per_step_ours: float, per_step_ref: float) -> float:
    """Throughput ratio ours / ref: the median of per-round ratios when the two were timed in the same
    rounds (the same load on both), else the ratio of medians."""
    if len(ours.samples) == len(ref.samples) and ours.samples:
        return statistics.median((per_step_ours / a["step"]) / (per_step_ref / b["step"])
                                 for a, b in zip(ours.samples, ref.samples))
    return (per_step_ours / ours.median()) / (per_step_ref / ref.median())


def format_memory(mem: dict[str, float], device: str, isolated: bool) -> str:
    """Peak MiB; for a CPU process of its own, with its growth over the idle process in brackets."""
    if torch.device(device).type == "cuda" or not isolated:
        return f"{mem['peak_mib']:,.0f}"
    idle = mem.get("idle_mib")
    if idle is None or idle != idle:
        return f"{mem['peak_mib']:,.0f}"
    return f"{mem['peak_mib']:,.0f} (+{mem['peak_mib'] - idle:,.0f})"


def memory_note(device: str, isolate: bool) -> str:
    if torch.device(device).type == "cuda":
        return "peak memory: `torch.cuda.max_memory_allocated` (tensors: weights, gradients, AdamW state, activations), MiB"
    if isolate:
        return ("peak memory: peak RSS (`ru_maxrss`) of a fresh process that ran only that row, MiB; in brackets the "
                "growth over that process once its imports were done and before the model was built (weights, "
                "optimizer state, data and activations; the rest is Python, torch and the libraries)")
    return "peak memory: peak RSS (`ru_maxrss`) of this process so far (all rows share it), MiB"


# --- tables and docs -----------------------------------------------------------------------------------

@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, *cells) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, table has {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    def column(self, name: str) -> list[str]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def markdown(self) -> str:
        numeric = [all(_is_number(r[i]) for r in self.rows) and bool(self.rows) for i in range(len(self.columns))]
        lines = ["| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def _is_number(cell: str) -> bool:
    return re.fullmatch(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?x?( \(\+[\d,]+\))?|—", cell.strip()) is not None


def today() -> str:
    return datetime.date.today().isoformat()


def command_line(module: str, argv: list[str] | None) -> str:
    args = argv if argv is not None else sys.argv[1:]
    return " ".join([f"python -m {module}", *args])


def update_section(doc: str | os.PathLike, heading: str, body: str) -> None:
    """Replace the level-2 section `## heading` of `doc` with `body`, or append it; other sections are kept."""
    doc = Path(doc)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"## {heading}\n\n{body.strip()}\n"
    match = re.search(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if match is None:
        text = text.rstrip("\n") + f"\n\n{block}"
    else:
        text = text[: match.start()] + block + ("\n" if match.end() < len(text) else "") + text[match.end():]
    write_text(doc, text.rstrip("\n") + "\n")


def run_and_report(args, run: Callable[[Any], Table], command: str, heading: str, load_note: str = "") -> Table:
    """A speed benchmark's main once its arguments are parsed: `run(args)`, print the table and its notes,
    and with `args.write_docs` put them, with the command, machine, date, load and wall time, under
    `## heading` of `args.doc`. Returns the table (the smoke tests read it)."""
    load_start, t = load_average(), time.perf_counter()
    table = run(args)
    seconds = time.perf_counter() - t
    print(table.markdown())
    for n in table.notes:
        print(f"- {n}")
    if args.write_docs:
        body = "\n".join([
            f"- command: `{command}`",
            f"- machine: {machine(args.device)}",
            f"- date: {today()}",
            f"- load: 1-minute load average {load_start:.1f} at the start, {load_average():.1f} at the end; "
            f"other jobs shared this machine, so absolute times are noisy{load_note}",
            f"- whole command: {seconds / 60:.1f} min",
            *[f"- {n}" for n in table.notes],
            "",
            table.markdown(),
        ])
        update_section(args.doc, heading, body)
        print(f"updated {args.doc}")
    return table

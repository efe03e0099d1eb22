import hashlib
import os
import sys
from pathlib import Path

# Tests run on 2 cores, sometimes beside other jobs and always beside DataLoader workers or a second
# rank: one intra-op thread avoids OpenMP spin-wait thrashing (measured 7x faster under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed's CPU ranks JIT-build one C++ op (deepspeed_shm_comm) under TORCH_EXTENSIONS_DIR, and its build
# command names the venv's own path: two checkouts whose venvs share one home folder rebuilt it in turn,
# 1.5-7 min of both cores in the first DeepSpeed launch of each test run. One build folder per venv keeps
# each venv's build.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(
    Path.home() / ".cache" / "torch_extensions" / f"mimfm-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest


@pytest.hookimpl(optionalhook=True)  # pytest without pytest-xdist (or -p no:xdist) runs on
def pytest_xdist_make_scheduler(config, log):
    """Under `pytest -n N` (make test): one test module per work unit, so that a module's fixtures are built
    once, and the two DeepSpeed modules in one unit, so that their shared 2-rank runs (`ds_runs`, the
    suite's longest set-up) are launched once. Another --dist than the default keeps its own scheduler."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "deepspeed" if Path(module).name.startswith("test_deepspeed") else module

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory):
    """A small built-in synthetic cohort shared by the end-to-end tests (generated, never downloaded)."""
    from data.synth import generate_cohort
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    generate_cohort(out, n_unlabeled=4, n_labeled=30, n_external=8, seed=0)
    return out


@pytest.fixture(scope="session")
def ds_runs(synth_cohort, tmp_path_factory):
    """The 2-rank DeepSpeed / DDP pretraining runs of tests/ds_reference.py: each launched once per session, on
    first use, for tests/test_deepspeed.py and tests/test_deepspeed_faults.py alike."""
    from ds_reference import ReferenceRuns
    return ReferenceRuns(tmp_path_factory.mktemp("ds_runs"), synth_cohort)

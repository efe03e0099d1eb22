"""Faults under DeepSpeed on 2 CPU ranks over gloo, through the shipped configs.

- A non-finite loss at a gradient-accumulation boundary micro-batch and at a non-boundary one: the
  spoiled optimizer step changes nothing, and the next good step is the one a run that never saw the bad
  micro-batch takes (issue 32, defect 8).
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_deepspeed import ROOT, launch

sys.path.insert(0, str(ROOT / "tests"))
import ds_nonfinite_script as plan  # noqa: E402


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

"""Faults under DeepSpeed on 2 CPU ranks over gloo, through the shipped configs.

- A non-finite loss at a gradient-accumulation boundary micro-batch and at a non-boundary one: the
  spoiled optimizer step changes nothing, and the next good step is the one a run that never saw the bad
  micro-batch takes (issue 32, defect 8).
- kill -9 at a seeded random moment of a resumed ZeRO-2 run (the whole job, mid-step) and of a resumed
  ZeRO-3 run (one rank alone, mid-checkpoint), then `--resume auto`: the final checkpoint and the loss
  curve equal an uninterrupted run's, bit for bit (issue 32, fault tests). The runs are the session's
  shared ones (tests/ds_reference.py): the kill is the middle part of the chain that tests/test_deepspeed.py
  also holds to the uninterrupted run.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import ds_nonfinite_script as plan
from ds_reference import HALF, ROOT, STEPS, failure_digest, launch, logged_steps, losses, weights


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
    launch(f"deepspeed_zero{stage}", str(ROOT / "tests" / "ds_nonfinite_script.py"), str(tmp_path), tee=True)
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

@pytest.mark.parametrize("stage", [2, 3])
def test_kill9_at_random_moments_then_resume_equals_uninterrupted(ds_runs, stage):
    full, chain = ds_runs.full(f"deepspeed_zero{stage}"), ds_runs.chain(stage)
    cut, kill = chain.run, chain.kill
    assert HALF < kill.step < STEPS  # in the resumed part, after its restore
    assert chain.latest_before_resume is not None and not chain.encoder_before_resume
    assert f"resumed from {chain.latest_before_resume}" in chain.resumed.stdout  # the newest complete one
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []  # bit for bit
    assert losses(full) == losses(cut) and logged_steps(cut) == list(range(1, STEPS + 1))
    assert not list((cut / "checkpoints").glob(".tmp-*")) and (cut / "encoder").is_dir()


def test_a_failed_launchs_message_keeps_each_ranks_error():
    # Rank 1 fails first; rank 0's lines and the launcher's summary then fill the end of the output, where a
    # message of its last 4000 characters once lost rank 1's own error.
    output = "\n".join(["[default1]:Traceback (most recent call last):", "[default1]:  File \"pretrain.py\"",
                         "[default1]:RuntimeError: rank 1 ran out of memory",
                         *[f"[default0]:step {i} still waiting for rank 1" for i in range(200)],
                         "[default0]:RuntimeError: Connection closed by peer",
                         "E1207 failed (exitcode: 1) local_rank: 1 (pid: 42) of binary: python",
                         *["=" * 60] * 20])
    assert "rank 1 ran out of memory" not in output[-4000:]
    digest = failure_digest(output).splitlines()
    assert digest[:2] == ["--- default0: 201 lines", "first error: RuntimeError: Connection closed by peer"]
    rank1 = digest[digest.index("--- default1: 3 lines"):]
    assert rank1[1:3] == [f"{which} error: RuntimeError: rank 1 ran out of memory" for which in ("first", "last")]
    assert "first error: E1207 failed (exitcode: 1) local_rank: 1 (pid: 42) of binary: python" in digest
    assert len("\n".join(digest)) < 2000

"""The survival heads' losses and scores: Cox partial likelihood (Efron ties), discrete-time hazard NLL,
and the risk of discrete hazards. models/tasks.py says which head a task grows.

The Cox loss is written by hand and tested against torchsurv's `neg_partial_log_likelihood(ties_method=
"efron")` and scikit-survival: torchsurv's Efron loops in Python over event times and sums exp(risk) without
a shift, so it overflows (NaN) at large risks and costs O(event times x N) Python steps; this one is one
vectorised pass in log space. The discrete-time NLL follows nnet-survival (Gensheimer & Narasimhan 2019)
with pycox's censoring convention.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


def cox_efron_loss(risk: torch.Tensor, time, event, reduction: str = "mean") -> torch.Tensor:
    """Negative Cox partial log-likelihood with Efron's handling of tied event times.

    risk: [N] log-hazard (linear predictor); time: [N] > 0; event: [N] 1 = event, 0 = censored.
    reduction: "mean" (divide by the number of events) or "sum".

    For an event time with d tied events D and risk set R, Efron's term is
        sum_{i in D} r_i - sum_{l=0}^{d-1} log( sum_R e^r - (l/d) sum_D e^r ).
    Each event in a tie group takes one l, so the sum runs over events, one term each.
    A batch with no events returns 0 still connected to `risk` (gradient zero, never NaN).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    risk = risk.reshape(-1)
    time = _as_tensor(time, risk.device).reshape(-1)
    event = _as_tensor(event, risk.device).reshape(-1).bool()
    if not (risk.shape == time.shape == event.shape):
        raise ValueError(f"risk, time and event must have the same length, "
                         f"got {tuple(risk.shape)}, {tuple(time.shape)}, {tuple(event.shape)}")
    n_events = int(event.sum())
    if n_events == 0:
        # Zero that keeps the graph, so DDP/accelerate see every parameter used.
        return (risk * 0.0).sum()

    # Latest time first: a running logsumexp then covers everyone with time >= t.
    order = torch.argsort(time, descending=True, stable=True)
    r, t, e = risk[order], time[order], event[order]  # [N]
    _, group = torch.unique(t, return_inverse=True)  # [N] tie-group id per row
    n_groups = int(group.max()) + 1
    positions = torch.arange(r.numel(), device=r.device)
    # The risk set of a tie group ends at its last row (ties are contiguous after sorting).
    last_row = torch.zeros(n_groups, dtype=torch.long, device=r.device).scatter_reduce(
        0, group, positions, reduce="amax", include_self=False
    )
    log_risk_set = torch.logcumsumexp(r, dim=0)[last_row]  # [G] log sum_R e^r

    ev = e.nonzero(as_tuple=True)[0]  # [E] rows with an event
    r_ev, g_ev = r[ev], group[ev]
    # log sum_D e^r per tie group, stabilised by the group max (detached: a constant shift).
    g_max = torch.full((n_groups,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(
        0, g_ev, r_ev.detach(), reduce="amax"
    )[g_ev]  # [E]
    sum_exp = torch.zeros(n_groups, dtype=r.dtype, device=r.device).scatter_add(0, g_ev, torch.exp(r_ev - g_max))
    # Index before log: log(0) at event-free groups would poison the backward pass with NaN.
    log_tied = torch.log(sum_exp[g_ev]) + g_max  # [E]
    d = torch.zeros(n_groups, dtype=r.dtype, device=r.device).scatter_add(0, g_ev, torch.ones_like(r_ev))[g_ev]
    first = torch.full((n_groups,), n_events, dtype=torch.long, device=r.device).scatter_reduce(
        0, g_ev, torch.arange(n_events, device=r.device), reduce="amin"
    )
    l = (torch.arange(n_events, device=r.device) - first[g_ev]).to(r.dtype)  # [E] 0..d-1 within the tie group

    lrs = log_risk_set[g_ev]  # [E]
    # log(S_R - (l/d) S_D) = log S_R + log1p(-(l/d) S_D/S_R); S_D <= S_R and l/d < 1 keep it finite.
    log_denominator = lrs + torch.log1p(-(l / d) * torch.exp(log_tied - lrs))
    neg_loglik = -(r_ev - log_denominator).sum()
    return neg_loglik / n_events if reduction == "mean" else neg_loglik


def gather_risk_set(risk: torch.Tensor, time, event) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's (risk [n_r], time [n_r], event [n_r]) -> the whole step's [N] tensors, in rank order, so the
    Cox risk sets do not depend on the per-GPU batch. Without a process group of 2+ ranks, the inputs as they are.

    The risks keep their gradient, and the backward sums every rank's gradient for the local rows, so each
    rank's loss is the whole batch's loss and DDP's (or DeepSpeed's) mean over ranks gives the single-process
    gradient. Ranks may hold different batch sizes: rows are padded to the largest, then cut.
    """
    time = _as_tensor(time, risk.device).reshape(-1)
    event = _as_tensor(event, risk.device).reshape(-1)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return risk, time, event
    risk = risk.reshape(-1)
    n = torch.tensor([risk.numel()], device=risk.device)
    sizes = [int(s) for s in _GatherWithGrad.gather(n)]  # [W] rows per rank
    pad = max(sizes) - risk.numel()

    def whole(parts: torch.Tensor) -> torch.Tensor:  # [W, max n_r] -> [N]
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    return (whole(_GatherWithGrad.apply(F.pad(risk, (0, pad)))),
            whole(_GatherWithGrad.gather(F.pad(time.double(), (0, pad)))),
            whole(_GatherWithGrad.gather(F.pad(event.double(), (0, pad)))))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather [m] -> [W, m] whose backward sums the gradient over ranks and keeps this rank's row.

    Written here because torch.distributed.nn.functional.all_gather (which does the same) is deprecated
    since torch 2.14 and the replacement it names lives in a private module.
    """

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)  # [W, m]

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _GatherWithGrad.gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()  # [W, m]: every rank's loss depends on every rank's rows
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def _as_tensor(x, device) -> torch.Tensor:
    # Fields of a structured array (sksurv's y["time"]) are strided views that torch refuses.
    return torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, device=device)


def discrete_time_nll(hazard_logits: torch.Tensor, bin_index, event) -> torch.Tensor:
    """Mean negative log-likelihood of the logistic discrete-time hazard model.

    hazard_logits: [N, T], logit of P(event in bin k | alive at its start); bin_index: [N];
    event: [N]. A subject with an event in bin b contributes log h_b + sum_{k<b} log(1 - h_k);
    one censored in bin b is taken to survive bin b (pycox convention): sum_{k<=b} log(1 - h_k).
    """
    n, n_bins = hazard_logits.shape
    bin_index = torch.as_tensor(bin_index, device=hazard_logits.device).long().reshape(-1)
    event = torch.as_tensor(event, device=hazard_logits.device).reshape(-1).to(hazard_logits.dtype)
    target = torch.zeros_like(hazard_logits)  # [N, T]
    target[torch.arange(n, device=hazard_logits.device), bin_index] = event
    at_risk = torch.arange(n_bins, device=hazard_logits.device)[None, :] <= bin_index[:, None]  # [N, T]
    bce = F.binary_cross_entropy_with_logits(hazard_logits, target, reduction="none")
    return (bce * at_risk).sum() / n


def survival_from_hazards(hazard_logits: torch.Tensor) -> torch.Tensor:
    """S(end of bin k) = prod_{j<=k} (1 - h_j), computed in log space: [N, T]."""
    return torch.exp(torch.cumsum(F.logsigmoid(-hazard_logits), dim=1))


def survival_risk_from_hazards(hazard_logits: torch.Tensor, edges=None) -> torch.Tensor:
    """Risk score [N] (higher = worse): minus the restricted mean survival time.

    With `edges` the mean is in time units (bin widths); without, in bins. Any monotone
    score works for C-index; this one uses the whole curve, not just its end.
    """
    surv = survival_from_hazards(hazard_logits)  # [N, T]
    if edges is None:
        widths = torch.ones(surv.shape[1], dtype=surv.dtype, device=surv.device)
    else:
        widths = torch.as_tensor(np.diff(np.asarray(edges, dtype=float)), dtype=surv.dtype, device=surv.device)
    # Survival over bin k is between S(start) and S(end); the end value is the conservative choice.
    return -(surv * widths).sum(dim=1)


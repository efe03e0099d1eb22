"""The Cox risk set does not depend on the per-rank batch: on 2 CPU ranks (gloo) the survival task's loss
equals the single-process loss on the whole batch, and the gradient averaged over ranks (what DDP and
DeepSpeed do) equals its gradient."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.tasks import SURVIVAL

F = 3
# Ties across the two ranks' shares (5.0 on both, 7.0 on both): the gathered Efron groups must merge them.
TIME = torch.tensor([2.0, 5.0, 5.0, 7.0, 9.0, 3.0, 5.0, 7.0, 7.0, 11.0, 4.0])
EVENT = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1])
SHARES = (slice(0, 6), slice(6, 11))  # unequal per-rank batches: 6 and 5 rows


def _data():
    x = torch.randn(len(TIME), F, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # [N, F]
    torch.manual_seed(1)
    return x, torch.nn.Linear(F, 1, bias=False).double()


def _loss(model, x, rows):
    out = {"risk": model(x[rows]).squeeze(-1)}  # [n]
    return SURVIVAL.loss(out, {"time": TIME[rows], "event": EVENT[rows]})["loss"]


def _rank(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, model = _data()
        loss = _loss(model, x, SHARES[rank])
        loss.backward()
        grad = model.weight.grad
        dist.all_reduce(grad)  # DDP's gradient reduction: the mean over ranks
        torch.save({"loss": loss.detach(), "grad": grad / 2}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cox_loss_on_two_ranks_equals_the_whole_batch_loss(tmp_path):
    x, model = _data()
    whole = _loss(model, x, slice(None))
    whole.backward()
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert abs(got["loss"].item() - whole.item()) < 1e-6, (rank, got["loss"], whole)
        torch.testing.assert_close(got["grad"], model.weight.grad, rtol=1e-5, atol=1e-7)

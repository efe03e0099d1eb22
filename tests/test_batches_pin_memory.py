"""engine.batches.ResumableBatches pins its batches when CUDA is there, so the step's
`.to(device, non_blocking=True)` (pretrain.batches.LevelBuilder) copies them asynchronously. There is no GPU
here: the checks are that the choice reaches the DataLoader, on the one path CPU and GPU share."""
import monai.data
import pytest
import torch

from engine.batches import ResumableBatches


@pytest.mark.parametrize("cuda, pin_memory, pinned", [(True, None, True), (False, None, False),
                                                      (True, False, False), (False, True, True)])
def test_pin_memory_follows_cuda_unless_given_and_reaches_the_dataloader(monkeypatch, cuda, pin_memory, pinned):
    asked = []

    class RecordingLoader(monai.data.DataLoader):
        """Records the pin_memory it is asked for; loads unpinned, as a host without a GPU must."""

        def __init__(self, *args, pin_memory=False, **kwargs):
            asked.append(pin_memory)
            super().__init__(*args, pin_memory=False, **kwargs)

    with monkeypatch.context() as cuda_here:  # only while the default is chosen, not while loading
        cuda_here.setattr(torch.cuda, "is_available", lambda: cuda)
        batches = ResumableBatches(list(range(6)), 2, seed=0, num_replicas=1, rank=0, pin_memory=pin_memory)
    monkeypatch.setattr(monai.data, "DataLoader", RecordingLoader)
    stream = batches.iterate(1)
    m, batch = next(stream)
    stream.close()
    assert asked == [pinned]
    unpinned = ResumableBatches(list(range(6)), 2, seed=0, num_replicas=1, rank=0, pin_memory=False).iterate(1)
    want_m, want = next(unpinned)
    unpinned.close()
    assert m == want_m == 1 and torch.equal(batch, want)

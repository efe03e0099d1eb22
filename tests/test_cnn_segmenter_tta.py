"""--tta of the whole-head search (finetune/lesion/search.py FlipAveraged): each window's probability is the mean over
its 8 axis flips, each flipped back; checked by hand on one window at the prepared scale."""
import numpy as np
import torch

from data.prep_config import PrepConfig
from finetune.lesion import search
from models.input_spec import InputSpec, ViewSpec

# one 8^3 window of 2 mm voxels, at the prepared scale (crop_mm = 8 x 2): the image is exactly one window
ONE_WINDOW = InputSpec(prep=PrepConfig(spacing=(2.0, 2.0, 2.0)), input_size=8, channels=("image", "lesion_mask"),
                       view=ViewSpec(crop_mm=16.0))


class Ramp:
    """Logits that ignore the image: a ramp from -3 to 3 along the window's first axis."""
    def segment(self, x):
        ramp = torch.linspace(-3.0, 3.0, x.shape[2]).view(1, 1, -1, 1, 1)
        return ramp.expand(x.shape[0], 1, *x.shape[2:])  # [B, 1, s, s, s]


class Identity:
    """Logits = the image: flipping the window and flipping the answer back must change nothing."""
    def segment(self, x):
        return x[:, :1]  # [B, 1, s, s, s]


def test_tta_is_the_mean_over_the_eight_flips():
    assert len(search.FLIPS) == 8 and len(set(search.FLIPS)) == 8
    image = np.zeros((1, 8, 8, 8), np.float32)
    plain = search.lesion_probability([Ramp()], image, ONE_WINDOW, 0.0)
    expected = 1 / (1 + np.exp(-np.linspace(-3, 3, 8)))
    np.testing.assert_allclose(plain, np.broadcast_to(expected[:, None, None], (8, 8, 8)), atol=1e-5)
    # half of the flips reverse the first axis: by hand, (sigmoid(r) + sigmoid(-r)) / 2 = 0.5 everywhere
    flipped = search.lesion_probability([search.FlipAveraged(Ramp())], image, ONE_WINDOW, 0.0)
    np.testing.assert_allclose(flipped, 0.5, atol=1e-5)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(search.lesion_probability([search.FlipAveraged(Identity())], image, ONE_WINDOW, 0.0),
                               1 / (1 + np.exp(-image[0])), atol=1e-5)

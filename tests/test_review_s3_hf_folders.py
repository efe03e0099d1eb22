"""Review finding (issue 35): the fine-tuned models' HF folders are written and read by one pair of functions
(models.hf.save_model_folder / load_model_folder), which both MultimodalModel and CNNSegmenter use: safetensors
out, safetensors in (nothing unpickled), config.json's model_type checked in one line, strict keys and shapes."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from core.errors import InputError
from models.cnn_segmenter import CNN_MODEL_TYPE, CNNSegConfig, CNNSegmenter
from models.hf import load_model_folder, save_model_folder
from models.multimodal import MODEL_TYPE, MultimodalModel
from test_auto_mask import SPEC  # a small input contract


class Tiny(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(2, width)


def _save(folder, module, **extra):
    save_model_folder(folder, module, model_type="tiny-type", architecture="Tiny", section="tiny",
                      section_config={"width": module.proj.out_features}, extra_config=extra,
                      card={"title": "tiny", "intended_use": "a test"}, card_shape={}, input_spec=SPEC)


def _load(folder, width=None):
    return load_model_folder(folder, model_type="tiny-type", section="tiny",
                             build=lambda d, where: Tiny(width or d["width"]))


def test_a_model_folder_is_safetensors_and_config_and_loads_back_exactly(tmp_path):
    torch.manual_seed(0)
    model = Tiny(3)
    _save(tmp_path / "m", model, note=1)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["README.md", "config.json", "input_spec.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "architectures", "tiny", "note")} == \
        {"model_type": "tiny-type", "architectures": ["Tiny"], "tiny": {"width": 3}, "note": 1}
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")["proj.weight"], model.proj.weight)
    loaded, read = _load(tmp_path / "m")
    assert torch.equal(loaded.proj.weight, model.proj.weight) and read == config


def test_a_reserved_key_in_extra_config_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"reserved key\(s\) \['tiny'\]"):
        _save(tmp_path / "m", Tiny(3), tiny=1)
    assert not (tmp_path / "m").exists()


def test_loading_is_strict_on_shapes(tmp_path):
    _save(tmp_path / "m", Tiny(3))
    with pytest.raises(InputError, match=r"shape mismatch .*proj\.weight \(3, 2\) != \(4, 2\)"):
        _load(tmp_path / "m", width=4)


def test_each_kind_refuses_the_others_folder_in_one_line(tmp_path):
    cnn = CNNSegmenter(CNNSegConfig(img_size=16, width=4))
    cnn.save_pretrained(tmp_path / "cnn", extra_config={}, card={}, input_spec=SPEC)
    with pytest.raises(InputError) as e:
        MultimodalModel.from_pretrained(tmp_path / "cnn")
    assert str(e.value) == f"{tmp_path / 'cnn'}: config.json is not a {MODEL_TYPE} model (model_type='{CNN_MODEL_TYPE}')"
    _save(tmp_path / "tiny", Tiny(3))
    with pytest.raises(InputError) as e:
        CNNSegmenter.from_pretrained(tmp_path / "tiny")
    assert str(e.value) == f"{tmp_path / 'tiny'}: config.json is not a {CNN_MODEL_TYPE} model (model_type='tiny-type')"
    model, _ = CNNSegmenter.from_pretrained(tmp_path / "cnn")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), cnn.state_dict().values()))

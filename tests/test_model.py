import json

import pytest
import torch

from pipeline import ClassConditionedUNet
from tests.conftest import TINY_UNET_CONFIG


def test_default_config_is_the_seed_architecture():
    model = ClassConditionedUNet()
    config = model.unet.config
    assert tuple(config.block_out_channels) == (32, 64, 64)
    assert config.layers_per_block == 2
    assert tuple(config.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert tuple(config.up_block_types) == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert config.in_channels == 1 + 4 and config.out_channels == 1 and config.sample_size == 28
    # The seed's 1,708,201 parameters plus one 4-number embedding row for the "no class" id.
    assert sum(p.numel() for p in model.parameters()) == 1_708_201 + 4
    assert model.class_embedding.num_embeddings == 11 and model.null_class_id == 10


def test_forward_shape_and_return_dict(tiny_unet):
    sample = torch.randn(3, 1, 28, 28)
    timesteps = torch.tensor([0, 500, 999])
    labels = torch.tensor([0, 5, 10])  # 10 is the "no class" id
    output = tiny_unet(sample, timesteps, labels)
    assert output.sample.shape == (3, 1, 28, 28)
    (as_tuple,) = tiny_unet(sample, timesteps, labels, return_dict=False)
    torch.testing.assert_close(as_tuple, output.sample)


def test_class_label_changes_the_prediction(tiny_unet):
    torch.nn.init.normal_(tiny_unet.class_embedding.weight)
    sample = torch.randn(1, 1, 28, 28).repeat(10, 1, 1, 1)
    with torch.no_grad():
        output = tiny_unet(sample, 500, torch.arange(10)).sample
    # Same noisy image, ten classes: every pair of predictions differs.
    distances = torch.cdist(output.flatten(1), output.flatten(1))
    assert (distances + torch.eye(10)).min() > 1e-4


def test_save_and_load_round_trip(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = ClassConditionedUNet.from_pretrained(tmp_path)
    # JSON turns tuples into lists and int keys into strings; compare the configs as JSON.
    loaded_config = json.loads(loaded.to_json_string())
    assert loaded_config.pop("_name_or_path") == str(tmp_path)
    assert loaded_config == json.loads(tiny_unet.to_json_string())
    assert loaded.config.id2label["3"] == "3"
    loaded_state = loaded.state_dict()
    for name, tensor in tiny_unet.state_dict().items():
        assert torch.equal(tensor, loaded_state[name]), name


def test_rejects_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="divisible by norm_num_groups=8"):
        ClassConditionedUNet(**{**TINY_UNET_CONFIG, "block_out_channels": (16, 12, 16)})

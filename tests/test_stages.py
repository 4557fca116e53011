import pytest
import timm

from graft.models.stages import discover_stages


@pytest.mark.parametrize(
    "architecture, count, last",
    [
        ("resnet50", 5, "layer4"),
        ("tf_efficientnet_lite0", 8, "blocks.6+conv_head+bn2"),
        ("convnext_tiny", 6, "head"),
        ("vit_tiny_patch16_224", 13, "blocks.11+norm"),
    ],
)
def test_stages_cover_every_parameter_in_order(architecture, count, last):
    model = timm.create_model(architecture, pretrained=False, num_classes=0)
    stages = discover_stages(model)
    assert len(stages) == count
    assert stages[-1].name == last
    names = [n for stage in stages for n in stage.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert sum(s.num_params for s in stages) == sum(p.numel() for p in model.parameters())
    # input to head: the first stage holds the stem
    first = stages[0].param_names[0]
    assert any(key in first for key in ("conv1", "conv_stem", "stem", "patch_embed", "cls_token"))


def test_stage_channels_and_stride_come_from_feature_info():
    model = timm.create_model("resnet50", pretrained=False, num_classes=0)
    stages = discover_stages(model)
    assert [(s.out_channels, s.reduction) for s in stages[1:]] == [(256, 4), (512, 8), (1024, 16), (2048, 32)]

"""vision/ports.py: weights with the TF-port names (lukemelas' EfficientNet-PyTorch) pick timm's tf_ twin."""
from deltatune.vision.ports import is_tf_port, timm_twin

TF_KEYS = ["_conv_stem.weight", "_bn0.weight", "_bn0.bias", "_blocks.0._depthwise_conv.weight"]
TIMM_KEYS = ["conv_stem.weight", "bn1.weight", "bn1.bias", "blocks.0.0.conv_dw.weight"]
HAS = {"efficientnet_lite0", "tf_efficientnet_lite0", "resnet18"}.__contains__


def test_tf_port_weights_pick_the_tf_twin():
    assert is_tf_port(TF_KEYS) and not is_tf_port(TIMM_KEYS)
    assert timm_twin("efficientnet_lite0", TF_KEYS, HAS) == "tf_efficientnet_lite0"
    assert timm_twin("tf_efficientnet_lite0", TF_KEYS, HAS) == "tf_efficientnet_lite0"  # already the twin


def test_other_weights_or_no_twin_keep_the_name():
    assert timm_twin("efficientnet_lite0", TIMM_KEYS, HAS) == "efficientnet_lite0"  # timm's own naming
    assert timm_twin("resnet18", TF_KEYS, HAS) == "resnet18"  # timm has no tf_resnet18: key check decides

"""MAKNet: size, MAKConv groups, SPL, the timm model contract (heads, features, checkpointing)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import dompre  # noqa: F401  (registers maknet)
from dompre.models.heads import ScorePropagation
from dompre.models.maknet import MAKConv, MixPool


def _count(name: str, **kwargs) -> int:
    model = timm.create_model(name, device="meta", **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_maknet_has_the_papers_size_and_is_under_040_resnet18():
    n = _count("maknet", num_classes=115)
    assert abs(n - 4.50e6) / 4.50e6 <= 0.03, n
    assert n <= 0.4 * _count("resnet18", num_classes=115)
    assert _count("maknet_tiny") < 500_000 < _count("maknet_small") < n


def test_registered_with_ct_input_config():
    for name in ("maknet", "maknet_small", "maknet_tiny"):
        assert timm.is_model(name)
    cfg = timm.create_model("maknet", device="meta").pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 256, 256) and cfg["num_classes"] == 115


def test_makconv_groups_have_four_shapes_over_the_whole_input():
    torch.manual_seed(0)
    conv = MAKConv(6, 16, kernel_size=5)
    shapes = [tuple(c.weight.shape) for c in (conv.conv_kxk, conv.conv_1xk, conv.conv_kx1, conv.conv_1x1)]
    assert shapes == [(4, 6, 5, 5), (4, 6, 1, 5), (4, 6, 5, 1), (4, 6, 1, 1)]
    x = torch.randn(2, 6, 9, 11)
    y = conv(x)
    assert y.shape == (2, 16, 9, 11)
    # each quarter of the output is its own group's convolution of the whole input
    torch.testing.assert_close(y[:, 0:4], F.conv2d(x, conv.conv_kxk.weight, padding=2))
    torch.testing.assert_close(y[:, 4:8], F.conv2d(x, conv.conv_1xk.weight, padding=(0, 2)))
    torch.testing.assert_close(y[:, 8:12], F.conv2d(x, conv.conv_kx1.weight, padding=(2, 0)))
    torch.testing.assert_close(y[:, 12:16], F.conv2d(x, conv.conv_1x1.weight))
    conv.fused = True  # one padded k×k convolution computes the same thing
    torch.testing.assert_close(conv(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        MAKConv(6, 10)


def test_mixpool_is_between_avg_and_max():
    x = torch.tensor([[[[0., 4.], [2., 2.]]]])
    pool = MixPool()
    assert pool(x).item() == pytest.approx(0.5 * 4 + 0.5 * 2)
    with torch.no_grad():
        pool.gate.fill_(50.)
    assert pool(x).item() == pytest.approx(4.)


def test_spl_is_identity_at_init():
    spl = ScorePropagation(7)
    torch.testing.assert_close(spl.weight, torch.eye(7))
    assert torch.count_nonzero(spl.bias) == 0
    z = torch.randn(3, 7)
    torch.testing.assert_close(spl(z), z)
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model(x), model.head.fc(model.forward_head(feats, pre_logits=True)))


def test_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", num_classes=4, drop_rate=0.5).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    F.binary_cross_entropy_with_logits(out, torch.tensor([[1., 0., 1., 0.], [0., 1., 0., 0.]])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_drop_path_and_grad_checkpointing_train():
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", num_classes=3, drop_path_rate=0.2)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_reset_classifier_and_pre_logits():
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, model.head_hidden_size)
    assert model.head_hidden_size == 2 * model.num_features  # catavgmax
    model.reset_classifier(3)
    assert model(x).shape == (1, 3) and model.get_classifier().out_features == 3
    torch.testing.assert_close(model.spl.weight, torch.eye(3))
    model.reset_classifier(0)
    assert model(x).shape == (1, model.head_hidden_size)
    headless = timm.create_model("maknet_tiny", num_classes=0)
    assert isinstance(headless.spl, torch.nn.Identity)


def test_features_only_gives_five_scales():
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", features_only=True).eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    some = timm.create_model("maknet_tiny", features_only=True, out_indices=(2, 4))
    assert len(some(torch.randn(1, 3, 64, 64))) == 2
    full = timm.create_model("maknet_tiny").eval()
    with torch.no_grad():
        last, inter = full.forward_intermediates(torch.randn(1, 3, 64, 64), indices=(1, 4))
    assert [t.shape[1] for t in inter] == [full.feature_info[1]["num_chs"], full.num_features]
    torch.testing.assert_close(last, inter[-1])



def test_fastcatavgmax_head_gives_the_catavgmax_outputs_and_scripts():
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", num_classes=4).eval()
    assert model.head.global_pool.pool_type == "fastcatavgmax"
    slow = timm.create_model("maknet_tiny", num_classes=4, global_pool="catavgmax").eval()
    slow.load_state_dict(model.state_dict())  # pooling has no weights: the same checkpoints load into both
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, slow(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.jit.script(model)(x), y, rtol=1e-5, atol=1e-5)


def test_builds_on_the_meta_device_and_reset_classifier_keeps_device_and_dtype():
    model = timm.create_model("maknet_tiny", device="meta", num_classes=3)
    assert all(p.device.type == "meta" for p in model.parameters())
    model = timm.create_model("maknet_tiny", num_classes=3, drop_path_rate=0.1).to(torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(6)
    for p in (*model.get_classifier().parameters(), *model.spl.parameters()):
        assert p.dtype == torch.float64
    assert model.eval()(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 6)


def test_fine_parameter_groups_are_numeric_and_layer_decay_works():
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    model = timm.create_model("maknet_tiny", num_classes=3)
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert all(isinstance(g, int) for g in groups.values()) and len(set(groups.values())) > 8
    names = [n for n, _ in model.named_parameters()]
    order = [groups[n] for n in names]
    assert order == sorted(order)  # stem < stage 0 gate < its dense layers < its transition < stage 1 ...
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, layer_decay=0.7)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 8 and scales[-1] == pytest.approx(1.0)


def test_grad_checkpointed_intermediates_and_pruning():
    torch.manual_seed(0)
    model = timm.create_model("maknet_tiny", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    model.set_grad_checkpointing(True)
    trained = copy.deepcopy(model).train()
    last, inter = trained.forward_intermediates(x)
    last.sum().backward()
    assert trained.stem.conv.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[2], taps[2])
    model.prune_intermediate_layers([2])
    assert len(model.stages) == 2 and model.num_classes == 0 and model.num_features == model.feature_info[2]["num_chs"]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), taps[2])
        assert model(x).shape == taps[2].shape  # head removed, pooling too


def test_the_import_time_timm_check_is_the_declared_floor():
    import re
    from pathlib import Path

    from dompre.models.maknet import TIMM_FLOOR

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.findall(r'"timm>=([0-9.]+)"', text) == [".".join(map(str, TIMM_FLOOR))]

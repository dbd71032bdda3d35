"""MAKNet: a DenseNet-style CT backbone built from multi-shape (mixed asymmetric kernel) convolutions.

Paper (seed paper of dompre): Noisy Student self-training on ~1.5M unlabeled CT slices from TCIA with a MAKNet
teacher/student; 4.50M parameters for the 115 LesaNet body-part labels on 3-slice 256×256 inputs
(text-mined test AUC 0.9051, F1 0.2078). The paper describes the building blocks but gives no channel table,
so the table below is ours.

Blocks:
    * ``MAKConv`` — four kernel shapes in one layer (k×k, 1×k, k×1, 1×1); every group sees the whole input,
      the output channels are split equally between the groups and concatenated.
    * ``MixPool`` — a learned mix of max and average pooling (``a·max + (1−a)·avg``, ``a = sigmoid(w)``).
    * Dense blocks of 3 or 6 densely connected MAKConv layers, then a standard (1×1) convolution and CBAM;
      every convolution is followed by BatchNorm and Mish.
    * Head: global concat pooling (average ‖ max; timm's ``fastcatavgmax``, the same outputs as ``catavgmax``
      and scriptable), dropout, Linear, then the score propagation layer (SPL). ``model(x)`` returns the
      logits after the SPL.

Channel table (``maknet``; input 3×256×256, 115 classes; stem = 3×3/2 conv; every stage starts with MixPool /2;
parameters per row include BatchNorm and CBAM):

    =====  ==========  ======  ======  ======  ==================  ===========  ==========
    stage  resolution  layers  growth  kernel  dense block out     transition   parameters
    =====  ==========  ======  ======  ======  ==================  ===========  ==========
    stem   128×128     —       —       3×3     32                  —                   928
    0      64×64       3       32      3       32 + 3·32 = 128     1×1 → 64         33,701
    1      32×32       3       64      3       64 + 3·64 = 256     1×1 → 128       133,861
    2      16×16       6       96      3       128 + 6·96 = 704    1×1 → 352     1,113,125
    3      8×8         6       128     3       352 + 6·128 = 1120  1×1 → 768     3,001,445
    head   fastcatavgmax 1536 → dropout → Linear(1536, 115) → SPL Linear(115, 115)     190,095
    =====  ==========  ======  ======  ======  ==================  ===========  ==========

Total 4,473,155 parameters for 115 classes (paper: 4.50M; 0.40× ResNet18's 11.24M with the same head) and
0.75 GMACs per 3×256×256 image as four separate groups (1.0 GMACs as executed with the default fusing of stages
0–1, see ``MAKNet``; ResNet18: 2.37 GMACs). Measured on a busy shared 2-core CPU (tools/bench_model.py
--cpu-time, batch 4, 3×256×256): MAKNet trains 1.14–1.41× and infers 1.06–1.19× as many images per CPU-second as
ResNet18 (wall-clock ratios swung from 0.6× to 1.8× with other users' load; no GPU was available to measure). ``maknet_small`` (1.2M) and
``maknet_tiny`` (0.23M) keep the layout with fewer channels, for CPU tests and demos.

Input convention: the three channels are three consecutive CT slices (z−1, z, z+1), each HU-windowed to
[0, 255] (default window [−1024, 3071] HU as LesaNet), scaled to [0, 1] and normalised with mean/std 0.5.
"""
# No `from __future__ import annotations`: TorchScript cannot resolve string annotations.
import re
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

TIMM_FLOOR = (1, 0, 31)  # as pyproject.toml: ClassifierHead.num_features, device/dtype on timm layers, get_model_args
if tuple(int(v) for v in re.findall(r"\d+", timm.__version__)[:3]) < TIMM_FLOOR:
    raise ImportError(f"dompre needs timm >= {'.'.join(map(str, TIMM_FLOOR))}, found timm {timm.__version__}; "
                      f"run: pip install 'timm>={'.'.join(map(str, TIMM_FLOOR))}'")

from timm.layers import BatchNormAct2d, ClassifierHead, ConvNormAct, DropPath, calculate_drop_path_rates
from timm.layers.cbam import CbamModule
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # what every timm model uses; timm exports no public twin

from dompre.models.heads import ScorePropagation

__all__ = ["MAKConv", "MixPool", "MAKDenseBlock", "MAKStage", "MAKNet", "CT_MEAN", "CT_STD", "CT_HU_WINDOW"]

CT_MEAN = (0.5, 0.5, 0.5)
CT_STD = (0.5, 0.5, 0.5)
CT_HU_WINDOW = (-1024.0, 3071.0)
THREE_SLICE_NOTE = (
    "in_chans are three consecutive CT slices (z-1, z, z+1) of one series, each HU-windowed to [0, 255] "
    "(hu_window; LesaNet's default [-1024, 3071] HU), resized to input_size, then scaled to [0, 1] and normalised "
    "by mean/std"
)

# Stage spec: (num_layers, growth, out_chs, kernel_size)
StageSpec = Tuple[int, int, int, int]


class MAKConv(nn.Module):
    """Mixed asymmetric kernel convolution: k×k, 1×k, k×1 and 1×1 groups over the whole input, concatenated.

    Args:
        in_chs: input channels (every group sees all of them).
        out_chs: output channels, divisible by 4 (``out_chs // 4`` per group, in the order k×k, 1×k, k×1, 1×1).
        kernel_size: k (odd).
        stride: stride of every group.
        fused: run the four groups as one k×k convolution whose weight is built by zero-padding the smaller
            kernels (same result, one kernel launch; faster where launches dominate, 2.25× the MACs for k=3).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, fused: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if out_chs % 4 or kernel_size % 2 == 0:
            raise ValueError(f"MAKConv needs out_chs divisible by 4 and an odd kernel, got {out_chs}, {kernel_size}")
        k, p, g = kernel_size, kernel_size // 2, out_chs // 4
        dd = dict(bias=False, stride=stride, device=device, dtype=dtype)
        self.conv_kxk = nn.Conv2d(in_chs, g, (k, k), padding=(p, p), **dd)
        self.conv_1xk = nn.Conv2d(in_chs, g, (1, k), padding=(0, p), **dd)
        self.conv_kx1 = nn.Conv2d(in_chs, g, (k, 1), padding=(p, 0), **dd)
        self.conv_1x1 = nn.Conv2d(in_chs, g, (1, 1), padding=(0, 0), **dd)
        self.in_chs, self.out_chs, self.kernel_size, self.stride, self.fused = in_chs, out_chs, k, stride, fused

    def fused_weight(self) -> torch.Tensor:
        """The four group kernels zero-padded to k×k and stacked: (out_chs, in_chs, k, k)."""
        p = self.kernel_size // 2
        return torch.cat([
            self.conv_kxk.weight,
            F.pad(self.conv_1xk.weight, (0, 0, p, p)),
            F.pad(self.conv_kx1.weight, (p, p, 0, 0)),
            F.pad(self.conv_1x1.weight, (p, p, p, p)),
        ], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.conv2d(x, self.fused_weight(), stride=self.stride, padding=self.kernel_size // 2)
        return torch.cat([self.conv_kxk(x), self.conv_1xk(x), self.conv_kx1(x), self.conv_1x1(x)], dim=1)


class MixPool(nn.Module):
    """Mixed pooling: ``a·maxpool(x) + (1−a)·avgpool(x)`` with a learned gate ``a = sigmoid(w)`` (starts at 0.5)."""

    def __init__(self, kernel_size: int = 2, stride: int = 2, device=None, dtype=None) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.gate = nn.Parameter(torch.zeros((), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.gate)
        return torch.lerp(F.avg_pool2d(x, self.kernel_size, self.stride),
                          F.max_pool2d(x, self.kernel_size, self.stride), a)


class MAKDenseLayer(nn.Module):
    """MAKConv → BatchNorm → Mish producing ``growth`` new channels (with optional drop path)."""

    def __init__(self, in_chs: int, growth: int, kernel_size: int, drop_path: float = 0., fused: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.conv = MAKConv(in_chs, growth, kernel_size, fused=fused, device=device, dtype=dtype)
        self.bn = BatchNormAct2d(growth, act_layer=nn.Mish, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.bn(self.conv(x)))


class MAKDenseBlock(nn.Module):
    """Densely connected MAKConv layers: layer i sees the input and the outputs of all earlier layers."""

    def __init__(self, in_chs: int, growth: int, num_layers: int, kernel_size: int = 3,
                 drop_path_rates: Sequence[float] = (), fused: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        rates = list(drop_path_rates) or [0.] * num_layers
        self.layers = nn.ModuleList([
            MAKDenseLayer(in_chs + i * growth, growth, kernel_size, rates[i], fused, device=device, dtype=dtype)
            for i in range(num_layers)
        ])
        self.out_chs = in_chs + num_layers * growth
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            inp = torch.cat(feats, 1) if len(feats) > 1 else x
            feats.append(layer(inp))
        return torch.cat(feats, 1)


class MAKStage(nn.Module):
    """MixPool /2 → dense block → 1×1 ConvNormAct (Mish) → CBAM."""

    def __init__(self, in_chs: int, spec: StageSpec, drop_path_rates: Sequence[float] = (), fused: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        num_layers, growth, out_chs, kernel_size = spec
        dd = dict(device=device, dtype=dtype)
        self.pool = MixPool(2, 2, **dd)
        self.block = MAKDenseBlock(in_chs, growth, num_layers, kernel_size, drop_path_rates, fused, **dd)
        self.transition = ConvNormAct(self.block.out_chs, out_chs, 1, act_layer=nn.Mish, **dd)
        self.attn = CbamModule(out_chs, act_layer=nn.Mish, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.transition(self.block(self.pool(x))))


class MAKNet(nn.Module):
    """MAKNet backbone + concat avg‖max pooling classifier + score propagation layer, with the timm model interface.

    Args:
        stages: one ``(num_layers, growth, out_chs, kernel_size)`` per stage (each stage downsamples by 2).
        stem_chs: channels of the 3×3 stride-2 stem convolution.
        num_classes: number of labels (0: no classifier and no SPL; ``model(x)`` returns pooled features).
        in_chans: input channels (3 slices).
        global_pool: timm pooling type for the head (default 'fastcatavgmax': average ‖ max, scriptable).
        drop_rate: dropout before the classifier (the paper's student uses 0.5).
        drop_path_rate: stochastic depth over the dense layers, rising linearly to this value.
        fused_mak: run MAKConv as one padded k×k convolution (see ``MAKConv``): one bool, or one per stage.
            The default fuses the two high-resolution stages only: timed per stage on CPU (2 threads, wall
            clock), fusing was faster where activations are large and channels few (stages 0–1), the four
            separate groups (2.25× fewer MACs) where channels are many (stages 2–3); single-thread CPU time
            favours all-split by a few percent. Numerically the same; weights are interchangeable.
    """

    def __init__(self, stages: Sequence[StageSpec], stem_chs: int = 32, num_classes: int = 115, in_chans: int = 3,
                 global_pool: str = "fastcatavgmax", drop_rate: float = 0., drop_path_rate: float = 0.,
                 fused_mak: Union[bool, Sequence[bool]] = (True, True, False, False), device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        fused = [fused_mak] * len(stages) if isinstance(fused_mak, bool) else list(fused_mak)
        fused += [False] * (len(stages) - len(fused))
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.grad_checkpointing = False
        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=2, act_layer=nn.Mish, **dd)
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module="stem")]
        total_layers = sum(s[0] for s in stages)
        dpr = calculate_drop_path_rates(drop_path_rate, total_layers) if total_layers else []  # CPU, also under meta
        blocks, prev, start = [], stem_chs, 0
        for i, spec in enumerate(stages):
            blocks.append(MAKStage(prev, tuple(spec), dpr[start:start + spec[0]], fused[i], **dd))
            start += spec[0]
            prev = spec[2]
            self.feature_info.append(dict(num_chs=prev, reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*blocks)
        self.num_features = prev
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.head.num_features
        self.spl = ScorePropagation(num_classes, **dd) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(".gate")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer decay: stem, then per stage (coarse) or per dense layer (fine).

        Fine groups are numeric, as timm's grouping needs: ``(stage, 0)`` the MixPool gate, ``(stage, 1 + i)``
        dense layer i, ``(stage, 99999)`` the transition and CBAM that close the stage.
        """
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.pool\.", (0,)),
            (r"^stages\.(\d+)\.block\.layers\.(\d+)", (1,)),
            (r"^stages\.(\d+)\.(?:transition|attn)\.", (99999,)),
        ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier and the SPL for ``num_classes`` labels (0 removes both), on the model's
        device and dtype; ``global_pool`` None keeps the pooling, '' removes it."""
        self.num_classes = num_classes
        dd = dict(device=self.stem.conv.weight.device, dtype=self.stem.conv.weight.dtype)
        self.head.reset(num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.head.in_features * self.head.global_pool.feat_mult()
        self.spl = ScorePropagation(num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.spl.train(self.training)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's intermediate-feature API: outputs of the stem (0) and stages (1–4) named by ``indices``."""
        if output_fmt != "NCHW":
            raise ValueError(f"MAKNet intermediates are NCHW only, got output_fmt={output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        feats = []
        x = self.stem(x)
        if 0 in take:
            feats.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            x = checkpoint(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if i in take:
                feats.append(x)
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last tap in ``indices`` (and the head and SPL when the features end earlier,
        or with ``prune_head``); returns the kept tap indices. MAKNet has no final norm, ``prune_norm`` is moot."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.feature_info) - 1
        self.stages = self.stages[:max_index]  # tap 0 is the stem, tap i the output of stage i - 1
        if prune_end:  # the head was sized for the last stage's features
            self.num_features = self.feature_info[max_index]["num_chs"]
            self.head.reset(0, pool_type="", in_features=self.num_features, device=self.stem.conv.weight.device,
                            dtype=self.stem.conv.weight.dtype)
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return self.head(x, pre_logits=True)
        return self.spl(self.head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict'|'model'|'model_state_dict': ...}`` and strip DDP ``module.`` / torch.compile
    ``_orig_mod.`` prefixes: :func:`dompre.checkpoint.unwrap_state_dict`, the one unwrapper."""
    # imported here, not at the top: `import dompre` imports this module, and dompre.checkpoint imports the store
    # module (pandas), which `import dompre` keeps out (+0.27-0.49 s measured with -X importtime)
    from dompre.checkpoint import unwrap_state_dict

    return unwrap_state_dict(state_dict)


def _create_maknet(variant: str, pretrained: bool = False, **kwargs: Any) -> MAKNet:
    return build_model_with_cfg(
        MAKNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url, "num_classes": 115, "input_size": (3, 256, 256), "pool_size": (8, 8),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": CT_MEAN, "std": CT_STD,
        "first_conv": "stem.conv", "classifier": ("head.fc", "spl"),
        "paper_name": "Noisy Student domain pretraining for CT (MAKNet)", "license": "bsd-3-clause",
        "notes": (THREE_SLICE_NOTE, f"hu_window={list(CT_HU_WINDOW)}"),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "maknet.untrained": _cfg(),
    "maknet_small.untrained": _cfg(),
    "maknet_tiny.untrained": _cfg(input_size=(3, 128, 128), pool_size=(4, 4)),
})


@register_model
def maknet(pretrained: bool = False, **kwargs: Any) -> MAKNet:
    """MAKNet, 4.47M parameters for 115 classes (the paper's 4.50M)."""
    args = dict(stem_chs=32, stages=((3, 32, 64, 3), (3, 64, 128, 3), (6, 96, 352, 3), (6, 128, 768, 3)))
    return _create_maknet("maknet", pretrained, **dict(args, **kwargs))


@register_model
def maknet_small(pretrained: bool = False, **kwargs: Any) -> MAKNet:
    """MAKNet-small, about a quarter of MAKNet's parameters."""
    args = dict(stem_chs=24, stages=((3, 16, 48, 3), (3, 32, 96, 3), (6, 48, 176, 3), (6, 64, 320, 3)))
    return _create_maknet("maknet_small", pretrained, **dict(args, **kwargs))


@register_model
def maknet_tiny(pretrained: bool = False, **kwargs: Any) -> MAKNet:
    """MAKNet-tiny, a few hundred thousand parameters, for CPU tests and demos (64–128 px)."""
    args = dict(stem_chs=16, stages=((3, 8, 32, 3), (3, 16, 64, 3), (3, 24, 128, 3), (3, 32, 192, 3)))
    return _create_maknet("maknet_tiny", pretrained, **dict(args, **kwargs))

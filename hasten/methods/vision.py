"""Methods for convolutional image models: BlurPool, channels-last memory format, progressive resizing.

>>> blur_kernel()
tensor([[0.0625, 0.1250, 0.0625],
        [0.1250, 0.2500, 0.1250],
        [0.0625, 0.1250, 0.0625]])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hasten.methods.registry import Method, has_module, progress, register, swap_modules


# ---- BlurPool (Zhang 2019, Making Convolutional Networks Shift-Invariant Again) ------------------------------


def blur_kernel(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 3×3 binomial low-pass filter [1,2,1]ᵀ[1,2,1]/16 (Zhang 2019, §3.2, "Tri-3")."""
    row = torch.tensor([1.0, 2.0, 1.0], dtype=dtype, device=device)
    return torch.outer(row, row) / 16.0


def blur2d(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Low-pass filter each channel of (B, C, H, W) ``x`` with :func:`blur_kernel` (reflect padding, as in Zhang
    2019), then subsample by ``stride``."""
    channels = x.shape[1]
    weight = blur_kernel(x.dtype, x.device).expand(channels, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, stride=stride, groups=channels)


class BlurMaxPool2d(nn.Module):
    """MaxPool(k, stride 1) then blur with the pool's stride ("MaxBlurPool", Zhang 2019, Fig. 2): same output
    size as the max-pool it replaces, no parameters."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.kernel_size, self.padding, self.dilation = pool.kernel_size, pool.padding, pool.dilation
        self.stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(x, self.kernel_size, stride=1, padding=self.padding, dilation=self.dilation)
        return blur2d(x, self.stride)


class BlurConv2d(nn.Conv2d):
    """A strided convolution that blurs its input first (Composer's ``blur_first``); it shares the weight and bias
    of the convolution it replaces, so parameter names and the optimizer's references are unchanged."""

    @classmethod
    def wrap(cls, conv: nn.Conv2d) -> "BlurConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(blur2d(x, 1))


def _strided_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and max(m.stride) > 1 and min(m.kernel_size) > 1


def _max_pool(m: nn.Module) -> bool:
    return type(m) is nn.MaxPool2d and (m.stride if isinstance(m.stride, int) else max(m.stride)) > 1


@register("blurpool", stage=90, domain="vision",
          summary="low-pass filter before every strided max-pool and convolution (anti-aliased downsampling)",
          citation="Zhang 2019, Making Convolutional Networks Shift-Invariant Again (ICML)",
          effect="accuracy gain on ImageNet-scale CNNs at ~10-20% more compute per step; small tasks: little")
@dataclass
class BlurPool(Method):
    max_pools: bool = True  # replace strided nn.MaxPool2d by MaxPool(stride 1) + blur(stride)
    convs: bool = True  # blur the input of strided nn.Conv2d (3×3 or larger)

    def applies_to(self, task, model):
        if model is not None and not any((self.max_pools and _max_pool(m)) or (self.convs and _strided_conv(m))
                                         for m in model.modules()):
            return "the model has no strided Conv2d or MaxPool2d to anti-alias"
        return None

    def prepare_model(self, model: nn.Module) -> None:
        if self.max_pools:
            swap_modules(model, _max_pool, BlurMaxPool2d)
        if self.convs:
            swap_modules(model, _strided_conv, BlurConv2d.wrap)


# ---- channels-last memory format ------------------------------------------------------------------------------


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) stored as (B, H, W, C): the layout cuDNN / oneDNN convolutions prefer (NHWC)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@register("channels_last", stage=80, domain="vision",
          summary="store images and conv weights as NHWC (channels last) instead of NCHW",
          citation="PyTorch channels-last memory format; NVIDIA Tensor Core NHWC convolutions",
          effect="faster convolutions on GPUs with Tensor Cores (AMP); on CPU it can be slower: measure")
@dataclass
class ChannelsLast(Method):
    def applies_to(self, task, model):
        return None if has_module(model, nn.Conv2d) else "the model has no Conv2d: memory format does not matter"

    def prepare_model(self, model: nn.Module) -> None:
        model.to(memory_format=torch.channels_last)

    def on_batch_ready(self, state) -> None:
        x, *rest = state.batch
        state.batch = (to_channels_last(x), *rest)


# ---- progressive resizing (Howard, fast.ai DAWNBench 2018; Touvron et al. 2019, FixRes) -----------------------


def resize_scale(progress: float, initial: float = 0.5, delay: float = 0.5, finetune: float = 0.2) -> float:
    """Image side scale: ``initial`` until ``delay`` of the run, then linear up to 1 at ``1 − finetune``, then 1
    (the schedule of MosaicML Composer's progressive resizing)."""
    if progress <= delay:
        return initial
    ramp = max(1.0 - finetune - delay, 1e-12)
    return min(initial + (1.0 - initial) * (progress - delay) / ramp, 1.0)


def resize_images(x: torch.Tensor, scale: float, multiple: int = 4, mode: str = "bilinear") -> torch.Tensor:
    """Resize (B, C, H, W) so each side is ``scale`` × its size rounded down to a multiple of ``multiple`` (at
    least ``multiple``); scale 1 returns ``x`` itself."""
    h, w = x.shape[-2:]
    new = [max(multiple, int(s * scale) // multiple * multiple) if scale < 1 else s for s in (h, w)]
    if new == [h, w]:
        return x
    return F.interpolate(x, size=new, mode=mode, align_corners=False, antialias=mode in ("bilinear", "bicubic"))


@register("progressive_resizing", stage=50, domain="vision",
          summary="train on down-scaled images early on, growing to full size (fewer pixels per step)",
          citation="Howard 2018 (fast.ai DAWNBench); Touvron et al. 2019, Fixing the train-test resolution "
                   "discrepancy; MosaicML Composer",
          effect="up to ~scale² cheaper early steps on compute-bound CNNs; needs a size-agnostic model")
@dataclass
class ProgressiveResizing(Method):
    initial: float = 0.5  # side scale at the start
    delay: float = 0.5  # fraction of the run at the initial scale
    finetune: float = 0.2  # final fraction of the run at full size
    multiple: int = 4  # round sides down to a multiple of this

    def applies_to(self, task, model):
        if not has_module(model, nn.Conv2d):
            return "it resizes (C, H, W) images and the model has no Conv2d (inputs are not images)"
        if has_module(model, nn.Linear) and not has_module(model, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return "the model flattens a fixed-size feature map into a Linear layer (no global pooling), so it " \
                   "cannot take smaller images"
        return None

    def on_batch_ready(self, state) -> None:
        x, *rest = state.batch
        scale = resize_scale(progress(state), self.initial, self.delay, self.finetune)
        state.batch = (resize_images(x, scale, self.multiple), *rest)

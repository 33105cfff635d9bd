"""BlurPool, channels-last and progressive resizing against hand-computed kernels, shapes and schedule values."""
import pytest
import torch
from torch import nn

from hasten.methods.vision import (
    BlurConv2d, BlurMaxPool2d, BlurPool, ChannelsLast, ProgressiveResizing, blur2d, blur_kernel, resize_images,
    resize_scale, to_channels_last,
)
from hasten.tasks.models import small_cnn

from .helpers import make_state


def test_blur_kernel_is_binomial_outer_product():
    expected = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    assert torch.equal(blur_kernel(), expected)
    assert blur_kernel().sum() == 1


def test_blur2d_impulse_response_and_constant_image():
    x = torch.zeros(1, 2, 5, 5)
    x[0, 1, 2, 2] = 16.0
    out = blur2d(x)
    assert torch.equal(out[0, 0], torch.zeros(5, 5))  # channels are filtered separately
    assert torch.equal(out[0, 1, 1:4, 1:4], torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]))
    assert out[0, 1].sum() == 16
    const = torch.full((1, 3, 6, 7), 2.5)
    assert torch.allclose(blur2d(const), const)  # reflect padding keeps a constant image constant
    assert blur2d(const, stride=2).shape == (1, 3, 3, 4)


@pytest.mark.parametrize("side", [28, 27, 7, 8])
@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1)])
def test_blur_max_pool_keeps_output_size(side, kernel, stride, padding):
    pool = nn.MaxPool2d(kernel, stride, padding)
    x = torch.randn(2, 3, side, side)
    assert BlurMaxPool2d(pool)(x).shape == pool(x).shape


def test_blur_conv_shares_parameters_and_blurs_first():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
    blurred = BlurConv2d.wrap(conv)
    assert blurred.weight is conv.weight and blurred.bias is conv.bias
    x = torch.randn(1, 2, 8, 8)
    assert torch.allclose(blurred(x), conv(blur2d(x)), atol=1e-6)


def test_blurpool_on_small_cnn_keeps_state_dict_and_shapes():
    torch.manual_seed(0)
    model = small_cnn()
    keys = list(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    before = model(x).shape
    method = BlurPool()
    assert method.applies_to(None, model) is None
    method.prepare_model(model)
    assert sum(isinstance(m, BlurMaxPool2d) for m in model.modules()) == 2
    assert list(model.state_dict()) == keys and model(x).shape == before
    assert BlurPool().applies_to(None, nn.Sequential(nn.Linear(3, 2))) is not None


def test_channels_last_layout():
    x = torch.randn(2, 3, 4, 5)
    y = to_channels_last(x)
    assert torch.equal(x, y) and y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == (60, 1, 15, 3)  # (B, C, H, W) strides of an NHWC buffer
    model = nn.Sequential(nn.Conv2d(3, 2, 3))
    state = make_state(model, (x, torch.zeros(2)))
    method = ChannelsLast()
    method.prepare_model(model)
    method.on_batch_ready(state)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert state.batch[0].is_contiguous(memory_format=torch.channels_last)


def test_resize_schedule_hand_values():
    # initial 0.5 until 50% of the run, linear to 1.0 at 80%, then 1.0.
    assert resize_scale(0.2) == 0.5 and resize_scale(0.5) == 0.5
    assert resize_scale(0.65) == pytest.approx(0.75)
    assert resize_scale(0.8) == pytest.approx(1.0) and resize_scale(0.95) == 1.0


def test_resize_images_rounds_to_multiple():
    x = torch.randn(2, 1, 28, 28)
    assert resize_images(x, 0.5).shape == (2, 1, 12, 12)  # 14 rounded down to a multiple of 4
    assert resize_images(x, 0.75).shape == (2, 1, 20, 20)  # 21 → 20
    assert resize_images(x, 1.0) is x
    assert torch.allclose(resize_images(torch.ones(1, 1, 8, 8), 0.5), torch.ones(1, 1, 4, 4))


def test_progressive_resizing_needs_global_pooling():
    method = ProgressiveResizing()
    assert "Linear" in method.applies_to(None, small_cnn())
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert method.applies_to(None, pooled) is None
    state = make_state(pooled, (torch.randn(3, 1, 16, 16), torch.zeros(3, dtype=torch.long)), steps=100, step=10)
    method.on_batch_ready(state)
    assert state.batch[0].shape == (3, 1, 8, 8) and pooled(state.batch[0]).shape == (3, 2)

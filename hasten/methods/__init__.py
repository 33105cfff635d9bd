"""Speedup methods that compose: pure tensor functions plus thin classes hooked to the training loop's events.

``build_methods("label_smoothing,ema:half_life=200", task, model)`` returns the callbacks in stage order;
``method_table()`` lists every registered method with its metadata (what `hasten methods` prints).
"""
from hasten.methods.registry import (
    METHODS, Method, MethodInfo, build_methods, get_method, method_table, parse_methods, register,
)

# Importing a module registers its methods.
from hasten.methods.data import (  # noqa: E402
    MaskSchedule, SelectiveBackprop, SeqLenWarmup, SortaGrad, mask_tokens, masking_rate, select_by_loss,
    selection_probabilities, sortagrad_order, warmup_length,
)
from hasten.methods.vision import (  # noqa: E402
    BlurConv2d, BlurMaxPool2d, BlurPool, ChannelsLast, ProgressiveResizing, blur2d, blur_kernel, resize_images,
    resize_scale, to_channels_last,
)
from hasten.methods.labels import (  # noqa: E402
    CutMix, LabelSmoothing, MixUp, cutmix, cutmix_box, mixup, smooth_labels, soft_cross_entropy,
)
from hasten.methods.adversarial import FGSM, PGD, fgsm, pgd, project  # noqa: E402
from hasten.methods.model import (  # noqa: E402
    LayerFreezing, StochasticDepth, Swish, SwishSwap, frozen_count, stochastic_depth, survival_probabilities, swish,
)
from hasten.methods.weights import (  # noqa: E402
    EMA, SAM, GradientClipping, adaptive_clip_coefficients, clip_coefficient, ema_update, sam_perturbation,
)

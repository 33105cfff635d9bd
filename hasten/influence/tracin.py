"""TracIn: training-data influence from checkpoints (Pruthi, Liu, Kale, Sundararajan 2020).

TracInCP(z, z') = Σᵢ ηᵢ ∇ℓ(wᵢ, z)·∇ℓ(wᵢ, z') over saved checkpoints wᵢ with learning rates ηᵢ (TracInCP);
positive scores mark proponents, negative ones opponents, and self-influence Σᵢ ηᵢ‖∇ℓ(wᵢ, z)‖² ranks likely
mislabeled examples first (their mislabeled-data experiments).

How it is computed: each checkpoint is loaded once; the test set's gradient features are formed once per
checkpoint and kept; the training set is streamed in batches, so memory is the (n_test, n_train) output plus one
batch. Linear layers use exact Gram factorizations (:mod:`hasten.measure.ghost`), other parameters torch.func
per-example gradients, and ``projection_dim`` a seeded Gaussian projection shared by all checkpoints.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
>>> tracin = TracIn(model, nn.functional.cross_entropy, [(model.state_dict(), 0.1)])
>>> tracin.influence(data, data).shape, tracin.self_influence(data).shape
(torch.Size([8, 8]), torch.Size([8]))
"""
from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Mapping
from contextlib import closing
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from hasten.errors import HastenError
from hasten.influence.checkpoints import check_fits, parse_checkpoints, read_state_dict
from hasten.influence.data import Examples
from hasten.influence.features import Extractor, Features, check_independent, dot, join
from hasten.influence.projection import GaussianProjection

TINY = 1e-30  # gradients with a smaller norm count as zero when normalizing


class TracIn:
    """TracInCP scores of a model over ``checkpoints`` = [(state_dict or path, learning_rate), ...].

    - ``loss_fn(outputs, targets)`` is the *mean* loss of a batch, with every example weighted equally (for a
      sequence model: the same number of tokens per example), so batch size × loss is the sum of per-example losses.
    - ``layers``: None = every trainable parameter; ``"last"`` = the last ``nn.Linear`` module (in registration
      order); a list of module names = the parameters of those modules.
    - ``projection_dim=d``: scores from Gaussian projections (entries N(0, 1/d)) of the per-example gradients,
      seeded by ``seed`` and identical at every checkpoint; unbiased, with error shrinking as 1/√d.
    - ``normalize=True``: cosine-style scores Σᵢ ηᵢ ĝᵢ(z)·ĝᵢ(z'), where ĝᵢ = ∇ℓ(wᵢ, ·)/‖∇ℓ(wᵢ, ·)‖ is normalized
      separately at every checkpoint over the selected parameters (after projection, if any), so a few examples
      with huge gradients no longer dominate every list. ``self_influence`` is never normalized (it would be Σᵢ ηᵢ
      for every example).

    Gradients are taken in eval mode (no dropout; BatchNorm uses its running statistics); the model's weights and
    mode are restored afterwards. Results are on the model's device, in its parameter dtype.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, checkpoints: Sequence, *,
                 layers: str | Sequence[str] | None = None, projection_dim: int | None = None, seed: int = 0,
                 normalize: bool = False, batch_size: int = 512):
        self.model, self.loss_fn = model, loss_fn
        self.checkpoints = parse_checkpoints(checkpoints)
        check_independent(model)
        self.linear, self.dense = select_parameters(model, layers)
        if projection_dim is not None and (isinstance(projection_dim, bool) or not isinstance(projection_dim, int)
                                           or projection_dim < 1):
            raise HastenError(f"projection_dim={projection_dim!r}: expected a positive integer or None")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise HastenError(f"batch_size={batch_size!r}: expected a positive integer")
        self.projection = GaussianProjection(projection_dim, seed) if projection_dim else None
        self.normalize, self.batch_size = bool(normalize), batch_size
        expected = model.state_dict()
        for i, (source, _) in enumerate(self.checkpoints):  # in-memory ones are checked now, files when read
            if isinstance(source, Mapping):
                check_fits(read_state_dict(source), expected, str(i))

    # -- public API -------------------------------------------------------------------------------------------
    def influence(self, train, test) -> torch.Tensor:
        """(n_test, n_train) TracInCP scores: row j holds every training example's influence on test example j."""
        train, test = Examples(train, "training"), Examples(test, "test")
        scores = None
        with closing(self._checkpoints()) as checkpoints:
            for lr, extract in checkpoints:
                te_feats, te = Features.cat([extract(x, y) for _, x, y in self._batches(test)]), None
                for start, x, y in self._batches(train):
                    tr_feats = extract(x, y)
                    if te is None and self.projection is not None:  # test set and first batch share one pass over P
                        f, norm, k = *self._encode(Features.cat([te_feats, tr_feats])), len(test)
                        te = (f[:k], None if norm is None else norm[:k])
                        tr = (f[k:], None if norm is None else norm[k:])
                    else:
                        te = te or self._encode(te_feats)
                        tr = self._encode(tr_feats)
                    block = _scores(tr, te, self.normalize)  # (n_batch, n_test)
                    if scores is None:
                        scores = block.new_zeros(len(test), len(train))
                    scores[:, start : start + len(y)] += lr * block.T
        return scores

    def self_influence(self, data) -> torch.Tensor:
        """(n,) self-influence Σᵢ ηᵢ‖∇ℓ(wᵢ, z)‖² (high: likely mislabeled or atypical); never normalized."""
        data = Examples(data, "")
        out = None
        with closing(self._checkpoints()) as checkpoints:
            for lr, extract in checkpoints:
                for start, x, y in self._batches(data):
                    feats = extract(x, y)
                    sq = feats.sqnorm() if self.projection is None else feats.project(self.projection).square().sum(1)
                    if out is None:
                        out = sq.new_zeros(len(data))
                    out[start : start + len(y)] += lr * sq
        return out

    def top_k(self, train, test, k: int, proponents: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, scores), each (n_test, k): the k training examples with the highest scores (proponents) or the
        lowest, most negative ones (opponents) for every test example, best first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise HastenError(f"k={k!r}: expected a positive integer")
        scores = self.influence(train, test)
        values, indices = torch.topk(scores if proponents else -scores, min(k, scores.shape[1]), dim=1)
        return indices, values if proponents else -values

    # -- internals --------------------------------------------------------------------------------------------
    def _checkpoints(self) -> Iterator[tuple[float, Extractor]]:
        """Load each checkpoint once into the model (eval mode); restore the model's weights and mode at the end."""
        model = self.model
        original = {k: v.detach().clone() for k, v in model.state_dict().items()}
        was_training = model.training
        extract = Extractor(model, self.loss_fn, self.linear, self.dense)
        model.eval()
        try:
            for i, (source, lr) in enumerate(self.checkpoints):
                state = read_state_dict(source)
                check_fits(state, original, str(i) if isinstance(source, Mapping) else f"{i} ({source})")
                model.load_state_dict(state)
                extract.verified = False
                yield lr, extract
        finally:
            model.load_state_dict(original)
            model.train(was_training)

    def _batches(self, data: Examples):
        device = next(self.model.parameters()).device
        for start, x, y in data.batches(self.batch_size):
            yield start, x.to(device), y.to(device)

    def _encode(self, feats: Features) -> tuple[Features | torch.Tensor, torch.Tensor | None]:
        """The features (projected, if asked) and, when normalizing, the per-example gradient norms."""
        if self.projection is not None:
            feats = feats.project(self.projection)
        if not self.normalize:
            return feats, None
        sq = feats.square().sum(1) if isinstance(feats, torch.Tensor) else feats.sqnorm()
        return feats, sq.sqrt()


def _scores(a: tuple, b: tuple, normalize: bool) -> torch.Tensor:
    """Gradient dot products between encoded examples ``(features or projections, norms)``, optionally cosine."""
    (fa, na), (fb, nb) = a, b
    out = fa @ fb.T if isinstance(fa, torch.Tensor) else dot(fa, fb)
    return out / (na[:, None] * nb[None, :]).clamp_min(TINY) if normalize else out


def select_parameters(model: nn.Module, layers) -> tuple[dict[str, nn.Linear], dict[str, nn.Parameter]]:
    """Split the selected trainable parameters into Gram-factorizable Linear layers and the rest (torch.func)."""
    modules = dict(model.named_modules())
    if layers is None:
        names = [""]
    elif layers == "last":
        linear = [name for name, m in modules.items() if type(m) is nn.Linear]
        if not linear:
            raise HastenError("layers='last' needs an nn.Linear layer and the model has none: name its modules instead")
        names = linear[-1:]
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        for name in names:
            if name not in modules:
                close = difflib.get_close_matches(str(name), [k for k in modules if k], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise HastenError(f"layers: the model has no module named {name!r}{hint}")
    selected: dict[str, nn.Parameter] = {}
    for name in names:
        for pname, p in modules[name].named_parameters():
            if p.requires_grad:
                selected[join(name, pname)] = p
    if not selected:
        raise HastenError(f"layers={layers!r} selects no trainable parameters")
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    linear = {}
    for name, m in modules.items():
        params = [join(name, k) for k, _ in m.named_parameters(recurse=False)] if type(m) is nn.Linear else []
        if params and all(p in selected and uses[id(selected[p])] == 1 for p in params):
            linear[name] = m
    covered = {join(n, k) for n in linear for k in ("weight", "bias")}
    return linear, {k: p for k, p in selected.items() if k not in covered}

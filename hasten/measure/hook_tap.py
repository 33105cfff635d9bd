"""Noise scale from per-example gradient norms read by hooks: B_small = 1, from one ordinary backward.

For the layers below, example i's gradient depends only on the layer's input x_i and on δ_i = ∂L/∂(output)_i, which
the backward of the batch loss computes anyway (Goodfellow 2015; formulas in :mod:`hasten.measure.ghost`). On a
measured step a forward hook keeps each layer's input and hooks its output; that hook reads δ during the backward and
adds the layer's Σ_i ‖g_i‖² to a scalar on the device (no host sync). :meth:`PerExampleTap.step` pairs it with the
accumulated ``.grad``, B_small = 1 and B_big = the batch (McCandlish et al. 2018, arXiv:1812.06162, eq. A.2), with
one host sync. On the other steps of ``every`` no hook is installed at all.

>>> tap = PerExampleTap(model)                      # doctest: +SKIP
>>> loss_fn(model(x), y).backward()                 # doctest: +SKIP
>>> tap.step()                                      # before clipping and optimizer.step()   # doctest: +SKIP
>>> tap.noise.compute().b_simple                    # doctest: +SKIP

What each backward must be: the mean of a per-example loss over the rows of its batch (dim 0 of every covered layer's
input), possibly divided by ``accumulation_steps`` (several backwards summed into ``.grad``) and multiplied by
``loss_scale`` (AMP). A backward of b_j examples then hands example i the gradient loss_scale·∇ℓ_i/(b_j·divisor),
which the tap scales back. With a token-mean loss over (B, T) the example is the row: ℓ_i is the mean over row i's
tokens (with a padding mask, the row's token sum times B/N_tokens), so the units are per sequence, not per token.

Covered: Linear (any leading dims), Conv1d/Conv2d (groups = 1), Embedding (without scale_grad_by_freq), LayerNorm,
GroupNorm, RMSNorm, and subclasses that keep their forward. Any other trainable parameter (a bare nn.Parameter used
in forward, nn.MultiheadAttention, BatchNorm, ...) makes the constructor raise: measure such models with micro-batches
(:class:`~hasten.measure.MicroBatchTap`). Refused with a HastenError rather than measured wrong: a layer run twice
in one backward's graph (weight sharing, recurrence), a parameter shared by two layers or also used outside its layer
(the model's graph is checked at the first measured forward, and each step checks that no covered parameter got a
gradient its layer did not see), layers that disagree on the batch size. Activation checkpointing works in its
non-reentrant form. A measured step costs about one more weight-gradient computation; others cost nothing.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from hasten.errors import HastenError
from hasten.measure import ghost
from hasten.measure.noise_scale import NoiseScale, load_meter_state, meter_state
from hasten.measure.tap import micro_batch_pair

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FALLBACK = "measure this model with micro-batches instead (MicroBatchTap; noise=micro)"


def _scan(model: nn.Module):
    """Covered layers [(name, module, rule, min_dim)], uncovered [(parameter, why)], shared [[parameter names]]."""
    attention = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
    layers, uncovered, owners = [], [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        params = [(f"{name}.{n}" if name else n, p) for n, p in module._parameters.items()
                  if p is not None and p.requires_grad]
        if not params:
            continue
        for pname, p in params:
            owners.setdefault(id(p), []).append(pname)
        found = ghost.layer_rule(module) if id(module) not in attention else "used by nn.MultiheadAttention's forward"
        if isinstance(found, str):
            uncovered += [(pname, found) for pname, _ in params]
        else:
            layers.append((name, module, *found))
    return layers, uncovered, [names for names in owners.values() if len(names) > 1]


def uncovered_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters :class:`PerExampleTap` has no per-example rule for (empty: fully covered).

    Parameters shared by two layers are covered by type but refused by the tap too (see its constructor).
    """
    return [name for name, _ in _scan(model)[1]]


def _param_uses(roots) -> dict[int, int]:
    """How many uses of each leaf parameter (by id) the autograd graph reachable from ``roots`` holds: the edges
    into its AccumulateGrad node, counting through the one low-precision copy that autocast caches per forward."""
    into, seen = {}, set(roots)  # node -> edges leading into it; each node's edges are walked once
    stack = list(seen)
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is not None:
                into[child] = into.get(child, 0) + 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    uses = {}
    for node, n in into.items():
        var = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if var is None and node.name() == "ToCopyBackward0" and len(node.next_functions) == 1:
            var, n = getattr(node.next_functions[0][0], "variable", None), n - 1  # an autocast copy of a leaf
        if var is not None:
            uses[id(var)] = uses.get(id(var), 0) + n
    return uses


def _skip() -> bool:
    """Inside a backward (a checkpointed forward recomputed) or a torch.func transform (e.g. per_example_sq_norms)."""
    return torch._C._current_graph_task_id() != -1 or torch._C._functorch.peek_interpreter_stack() is not None


class PerExampleTap:
    """Feeds a :class:`NoiseScale` with per-example gradient norms (B_small = 1) against the whole batch.

    Args:
        model: the module being trained (for DistributedDataParallel, its ``.module``: see :meth:`pending`).
        noise: the estimator to feed; a running-mean ``NoiseScale()`` if None.
        every: measure one optimizer step in ``every``; the hooks are installed only for those steps.

    Raises HastenError naming the parameters it cannot cover, or for BatchNorm in training mode.
    """

    def __init__(self, model: nn.Module, noise: NoiseScale | None = None, *, every: int = 1):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise HastenError("PerExampleTap hooks the layers themselves: pass ddp_model.module, all-reduce "
                              "tap.pending() across ranks and call tap.commit(...) instead of tap.step()")
        if every < 1:
            raise HastenError(f"every must be a positive number of steps, got {every}")
        self._batchnorms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._check_batchnorm()
        layers, uncovered, shared = _scan(model)
        if uncovered:
            names = ", ".join(f"'{n}' ({why})" for n, why in uncovered[:3]) + (
                f" and {len(uncovered) - 3} more" if len(uncovered) > 3 else "")
            raise HastenError(f"per-example gradient norms from hooks do not cover {names}: {_FALLBACK}")
        if shared:
            raise HastenError(f"parameters shared by two layers ({' = '.join(shared[0])}) need per-example gradients "
                              f"summed over the uses before squaring, which PerExampleTap does not do: {_FALLBACK}")
        if not layers:
            raise HastenError("the model has no trainable parameters: there is no gradient noise to measure")
        self._model, self._layers = model, layers
        self._params = [p for p in model.parameters() if p.requires_grad]
        device = self._params[0].device
        self._device, self._dtype = device, torch.float32 if device.type == "mps" else torch.float64
        self.noise = noise if noise is not None else NoiseScale()
        self.every, self._handles, self._removed, self._graph_checked = every, [], False, False
        self._generation = 0
        self.discard()
        self.steps = 0

    @property
    def steps(self) -> int:
        """Optimizer steps seen (measured or not): the phase of ``every``, kept in :meth:`state_dict`."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = value
        self._arm(value % self.every == 0 and not self._removed)

    @property
    def measuring(self) -> bool:
        """Whether the hooks are installed, i.e. the backwards before the next :meth:`step` are measured."""
        return bool(self._handles)

    def _arm(self, on: bool) -> None:
        if on and not self._handles:
            self._handles = [m.register_forward_hook(self._forward_hook(i), with_kwargs=True)
                             for i, (_, m, _, _) in enumerate(self._layers)]
            if not self._graph_checked:
                self._handles.append(self._model.register_forward_hook(self._check_graph))
        elif not on:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _forward_hook(self, index: int):
        name, module, rule, min_dim = self._layers[index]

        def hook(mod, args, kwargs, output):
            if not (isinstance(output, torch.Tensor) and output.requires_grad) or _skip():
                return  # no gradient will come, or not the training step's forward
            x = args[0] if args else next(iter(kwargs.values()))
            if x.dim() < min_dim:
                raise HastenError(f"layer '{name}' got an input of shape {tuple(x.shape)}, without a batch dimension: "
                                  f"per-example gradients need dim 0 to be the examples; {_FALLBACK}")
            saved, generation = x.detach() if ghost.trainable(mod, "weight") else None, self._generation
            output.register_hook(lambda delta: self._add(index, generation, rule, mod, saved, delta))

        return hook

    def _add(self, index, generation, rule, module, x, delta) -> None:
        """Output-gradient hook: add this layer's Σ_i ‖g_i‖²·b² (b = the backward's examples) on the device."""
        if generation != self._generation:  # a graph from before the last discard()
            return
        rows = self._backwards.setdefault(torch._C._current_graph_task_id(), {})
        if index in rows:
            self._problems.append(f"layer '{self._layers[index][0]}' ran twice in one backward's graph (weight sharing "
                                  "or recurrence: its per-example gradients would have to be summed before squaring)")
            return
        n = rows[index] = delta.shape[0]
        with torch.autocast(delta.device.type, enabled=False):
            total = rule(module, x, delta).sum(dtype=self._dtype) * (n * n)
        self._sum = total if self._sum is None else self._sum + total.to(self._sum.device)

    def _check_graph(self, model, args, output) -> None:
        """At the first measured forward: every covered parameter enters the model's graph at most once."""
        roots = [t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if self._graph_checked or not roots or _skip():
            return
        self._graph_checked = True
        uses = _param_uses(roots)
        for name, module, _, _ in self._layers:
            for pname, p in module.named_parameters(recurse=False):
                if uses.get(id(p), 0) > 1:
                    raise HastenError(
                        f"parameter '{name}.{pname}' enters one forward's graph {uses[id(p)]} times (a layer run "
                        "twice, or its weight also used outside it, e.g. tied output weights via F.linear): "
                        f"per-example gradients would have to be summed before squaring; {_FALLBACK}")

    def _check_batchnorm(self) -> None:
        for name, m in self._batchnorms:
            if m.training:
                raise HastenError(f"BatchNorm couples the examples of a batch ('{name}' is in training mode), so "
                                  f"per-example gradients do not exist: {_FALLBACK}, or use GroupNorm/LayerNorm")

    def discard(self) -> None:
        """Forget what the hooks read since the last :meth:`step` (e.g. backwards that are not part of the next
        step, such as SAM's second pass); graphs built before this call are ignored when their backward runs."""
        self._generation += 1
        self._backwards: dict[int, dict[int, int]] = {}  # per backward (graph task): {layer: examples}
        self._sum: torch.Tensor | None = None
        self._problems: list[str] = []

    def pending(self) -> torch.Tensor:
        """[S, n] on the device, without a host sync: S = Σ_i b_j²‖captured gᵢ‖² = Σ_i ‖∇ℓᵢ‖²·(loss_scale/divisor)²
        over the examples of the backwards since the last step, n their number (Σ_j b_j).

        Under DistributedDataParallel all-reduce (sum) it, e.g. stacked with the loss, and pass both entries to
        :meth:`commit`, with the hooks on ``ddp_model.module``.
        """
        s = self._sum if self._sum is not None else torch.zeros((), dtype=self._dtype, device=self._device)
        return torch.stack([s, torch.full_like(s, sum(next(iter(r.values())) for r in self._backwards.values()))])

    def commit(self, example_sq_sum, n_examples, batch_size: int | None = None, *, loss_scale: float = 1.0,
               accumulation_steps: int | None = None) -> bool:
        """Update the estimator from :meth:`pending`'s two entries (summed over ranks, if any) and ``.grad``.

        Args:
            example_sq_sum, n_examples: pending()[0] and pending()[1], tensors or numbers.
            batch_size: examples behind ``.grad`` (B_big); default ``n_examples``.
            loss_scale, accumulation_steps: as in :meth:`step`.

        Ends the step (like :meth:`step`). Returns whether it was measured: False, with no error, on a step the
        hooks were off, with no backward seen, with backwards of unequal sizes (``.grad`` is then not the batch
        mean), or with non-finite values (which the estimator counts as skipped).
        """
        if not loss_scale > 0:
            raise HastenError(f"loss_scale must be positive, got {loss_scale}")
        backwards, problems, measured = list(self._backwards.values()), self._problems, self.measuring
        self.discard()
        self.steps += 1
        self._check_batchnorm()
        for rows in backwards:
            if len(set(rows.values())) > 1:
                seen = ", ".join(f"'{self._layers[i][0]}' {n}" for i, n in list(rows.items())[:4])
                problems.append(f"layers disagree on the examples in one backward (rows along dim 0: {seen}); a layer "
                                "applied without the batch dimension (e.g. a position embedding of arange(T) broadcast "
                                "over the batch: give it arange(T).expand(B, T)) or a sequence-first layout")
        if problems:
            raise HastenError(f"{problems[0]}; {_FALLBACK}")
        if not measured or not backwards:
            return False
        reached = {i for rows in backwards for i in rows}
        missed = [p.grad for i, (_, m, _, _) in enumerate(self._layers) if i not in reached
                  for p in m.parameters(recurse=False) if p.requires_grad and p.grad is not None]
        grads = [p.grad for p in self._params if p.grad is not None]
        dtype = torch.float32 if any(g.dtype in _LOW_PRECISION for g in grads) else None
        norms = torch._foreach_norm([g.to_dense() if g.is_sparse else g for g in grads + missed], 2,
                                    dtype=dtype) if grads else []
        values = torch.stack([torch.as_tensor(v, dtype=self._dtype, device=self._device)
                              for v in (example_sq_sum, n_examples, *norms)]).tolist()  # the one host sync
        if any(v > 0 for v in values[2 + len(grads):]):
            raise HastenError("a covered layer's parameters got gradients without its forward running (its weight used "
                              f"elsewhere, or re-entrant activation checkpointing): {_FALLBACK}")
        sizes = {next(iter(rows.values())) for rows in backwards}
        n, b_big = values[1], batch_size if batch_size is not None else values[1]
        if len(sizes) > 1 or not n >= 1 or not b_big > 1:
            return False
        k = len(backwards)
        sq_accumulated = sum(v * v for v in values[2 : 2 + len(grads)])
        sq_small, sq_big = micro_batch_pair(values[0] / n, sq_accumulated, k, accumulation_steps or k, loss_scale, 1)
        return self.noise.update(sq_small=sq_small, b_small=1, sq_big=sq_big, b_big=b_big)

    def step(self, batch_size: int | None = None, *, loss_scale: float = 1.0,
             accumulation_steps: int | None = None) -> bool:
        """Measure the backwards since the last call; call after the last backward, before clipping.

        Args:
            batch_size: examples in this optimizer step, checked against those the layers saw (default: those).
            loss_scale: the factor the loss was multiplied by before backward (AMP: ``scaler.get_scale()``).
            accumulation_steps: what each backward's loss was divided by (default: the number of backwards since
                the last call; pass 1 if the losses were not divided).

        Returns whether the step was measured (see :meth:`commit`).
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise HastenError("under DistributedDataParallel .grad averages all ranks: all-reduce tap.pending() and "
                              "call tap.commit(...) instead of tap.step()")
        seen = sum(next(iter(rows.values())) for rows in self._backwards.values())
        if batch_size is not None and self._backwards and batch_size != seen:
            raise HastenError(f"batch_size={batch_size} but the covered layers saw {seen} examples along dim 0: the "
                              f"tap needs the batch on dim 0 of every layer's input (not a sequence-first layout)")
        total = self.pending()
        return self.commit(total[0], total[1], batch_size, loss_scale=loss_scale,
                           accumulation_steps=accumulation_steps)

    def remove(self) -> None:
        """Remove the hooks (the estimator keeps its state)."""
        self._removed = True
        self._arm(False)

    def state_dict(self) -> dict:
        return meter_state(self.noise, self.steps)

    def load_state_dict(self, state: dict) -> None:
        self.steps = load_meter_state(self.noise, state)

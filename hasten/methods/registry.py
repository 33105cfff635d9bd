"""The method registry: name → thin class + metadata, ``methods=a,b:key=value`` parsing, composition checks.

A speedup method is a pure tensor function (labels.py, vision.py, weights.py, model.py, data.py, adversarial.py)
plus a thin dataclass that binds its hyper-parameters and hooks loop events (:mod:`hasten.train.events`). Methods
compose by listing them; they fire in a fixed stage order (batch selection → input transforms → loss → model →
gradients → weights) whatever the order of the list, so ``a,b`` and ``b,a`` train the same way.

>>> [m.name for m in build_methods("ema,label_smoothing:alpha=0.2", task=None, model=None, check=False)]
['method:label_smoothing', 'method:ema']
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from hasten.errors import HastenError

DOMAINS = ("vision", "text", "any")


class Method:
    """Base of the thin classes: hyper-parameters are dataclass fields; a method hooks loop events by defining
    ``on_<event>(state)`` methods (:mod:`hasten.train.events`), like any callback.

    ``prepare_model(model)`` changes the model in place (module swaps); the loop calls it before it builds the
    optimizer and loads a checkpoint, so new parameters are trained and restored. ``applies_to(task, model)``
    returns ``None`` or one line saying why the method cannot apply. ``state_dict()`` holds what a resumed run
    needs beyond the step (most methods derive everything from the step and the seed and hold nothing).

    The noise meter measures the batch a step trains on, after every method's ``batch_ready``. A method that makes
    that batch something other than a uniform sample of the training set (a subset chosen by loss, an ordered
    epoch) sets ``state.skewed_batch`` to one line on those steps: the meter leaves them out. A method whose effect
    the meter cannot follow sets ``noise_bias`` (why, one line): ``batch=adaptive`` then refuses to run with it.
    """

    noise_bias = ""  # why the noise scale measured with this method is not the one its steps have ("" = it is)

    def applies_to(self, task: Any, model: nn.Module) -> str | None:
        return None

    def prepare_model(self, model: nn.Module) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class MethodInfo:
    """What `hasten methods` shows about a method, and how it composes."""

    name: str
    cls: type
    summary: str  # what it does, one line
    citation: str
    domain: str  # vision | text | any
    effect: str  # what to expect, honestly (including "slower per step")
    stage: int  # firing order: lower fires first at every event
    conflicts: tuple[str, ...] = ()  # methods it cannot be listed with

    def compatible_with(self, other: "MethodInfo") -> bool:
        return other.name != self.name and other.name not in self.conflicts and self.name not in other.conflicts


METHODS: dict[str, MethodInfo] = {}


def register(name: str, *, summary: str, citation: str, domain: str, effect: str, stage: int,
             conflicts: Iterable[str] = ()) -> Callable[[type], type]:
    """Class decorator: make ``cls`` (a dataclass of hyper-parameters, subclass of :class:`Method`) available by
    ``name``; its state is saved in checkpoints under ``method:<name>``."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")

    def wrap(cls: type) -> type:
        if not (dataclasses.is_dataclass(cls) and issubclass(cls, Method)):
            raise TypeError(f"{cls.__name__} must be a dataclass subclass of Method")
        cls.name = f"method:{name}"
        METHODS[name] = MethodInfo(name, cls, summary, citation, domain, effect, stage, tuple(conflicts))
        return cls

    return wrap


def get_method(name: str) -> MethodInfo:
    _load_all()
    if name not in METHODS:
        close = difflib.get_close_matches(name, sorted(METHODS), n=1)
        hint = f"did you mean {close[0]}?" if close else "see `hasten methods`"
        raise HastenError(f"unknown method {name!r}: {hint}")
    return METHODS[name]


def parse_methods(spec: str | Iterable[str]) -> list[tuple[str, list[str]]]:
    """``"mixup:alpha=0.4,ema"`` → ``[("mixup", ["alpha=0.4"]), ("ema", [])]`` (empty entries are skipped)."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for part in (p.strip() for p in parts):
        if part:
            name, *overrides = part.split(":")
            out.append((name.strip(), [o.strip() for o in overrides if o.strip()]))
    return out


def build_methods(spec: str | Iterable[str], task: Any, model: nn.Module | None, check: bool = True) -> list[Method]:
    """Instances of the listed methods in stage order; with ``check``, each must apply to ``(task, model)`` and
    be compatible with every other one, else a one-line :class:`HastenError` says which and why. A masked-LM
    model (one with a ``mask_id``) gets ``mask_schedule`` at a constant 15% unless the list has it."""
    from hasten.config import apply_overrides

    parsed = parse_methods(spec)
    names = [n for n, _ in parsed]
    if hasattr(model, "mask_id") and "mask_schedule" not in names:  # a masked-LM model always gets masking:
        parsed.append(("mask_schedule", ["schedule=constant"]))  # BERT's fixed 15% unless a schedule is listed
        names.append("mask_schedule")
    for n in names:
        if names.count(n) > 1:
            raise HastenError(f"method {n!r} is listed twice: list each method once (set options as {n}:key=value)")
    infos = [get_method(n) for n in names]
    for i, a in enumerate(infos):
        for b in infos[i + 1:]:
            if not a.compatible_with(b):
                raise HastenError(f"methods {a.name} and {b.name} cannot be combined: choose one of them")
    methods = []
    for info, (_, overrides) in zip(infos, parsed):
        method = apply_overrides(info.cls(), overrides)
        reason = method.applies_to(task, model) if check else None
        if reason:
            raise HastenError(f"{info.name} cannot apply to task {getattr(task, 'name', task)!r}: {reason}")
        methods.append(method)
    order = sorted(range(len(methods)), key=lambda i: (infos[i].stage, infos[i].name))
    return [methods[i] for i in order]


def method_table() -> list[dict]:
    """One row per registered method, in stage order: the metadata `hasten methods` prints."""
    _load_all()
    rows = []
    for info in sorted(METHODS.values(), key=lambda i: (i.stage, i.name)):
        params = {f.name: f.default for f in dataclasses.fields(info.cls)}
        rows.append(dict(name=info.name, summary=info.summary, citation=info.citation, domain=info.domain,
                         effect=info.effect, conflicts=list(info.conflicts), params=params))
    return rows


def _load_all() -> None:
    import hasten.methods  # noqa: F401  (importing the package registers every method)


# ---- small helpers the methods share -------------------------------------------------------------------------


def step_generator(state: Any, salt: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (run seed, step, ``salt``) alone: random draws repeat exactly on resume and differ
    between methods and steps."""
    seed = getattr(state.cfg, "seed", 0)
    digest = hashlib.sha256(f"{seed}:{state.step}:{salt}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def progress(state: Any) -> float:
    """Fraction of the run done at this step, in [0, 1]."""
    total = max(getattr(state.cfg, "steps", 1), 1)
    return min(max(state.step / total, 0.0), 1.0)


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The model's last ``nn.Linear`` (the classifier head of hasten's models), or None."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def has_module(model: nn.Module | None, kinds: type | tuple[type, ...]) -> bool:
    return model is not None and any(isinstance(m, kinds) for m in model.modules())


def is_cross_entropy(task: Any) -> bool:
    """Whether the task's loss is hasten's mean cross-entropy (classification or next-token prediction)."""
    from hasten.tasks.models import cross_entropy

    return getattr(task, "loss", None) is cross_entropy


def per_example_loss(loss_fn: Callable, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` (a mean over the batch) evaluated on each example alone: shape (B,)."""
    return torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(outputs, targets)


def swap_modules(model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule ``m`` with ``match(m)`` by ``make(m)`` in place; returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if name and match(m)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, make(module))
    return len(targets)

"""TracIn checkpoints: ``(state_dict or path, learning_rate)`` pairs, read one at a time and checked against the model.

A path may be a file of hasten's training loop (checksummed, :mod:`hasten.train.checkpoint`; its ``"model"`` entry
is used), a plain ``torch.save`` of a state_dict, or a ``torch.save`` of a dict holding one under ``"model"`` or
``"state_dict"``. Prefixes added by DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) are removed.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hasten.errors import HastenError

Source = Any  # a state_dict (Mapping[str, Tensor]) or a path
PREFIXES = ("module.", "_orig_mod.")


def parse_checkpoints(checkpoints: Sequence) -> list[tuple[Source, float]]:
    """Validate ``[(state_dict or path, lr), ...]``: every entry needs a finite learning rate ≥ 0; paths must exist."""
    if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
        raise HastenError("checkpoints must be a list of (state_dict or path, learning_rate) pairs")
    if not checkpoints:
        raise HastenError("no checkpoints given: pass [(state_dict or path, learning_rate), ...]")
    out = []
    for i, entry in enumerate(checkpoints):
        if isinstance(entry, (str, os.PathLike, Mapping)) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise HastenError(f"checkpoint {i} has no learning rate: pass (state_dict or path, learning_rate) pairs")
        source, lr = entry
        if isinstance(lr, torch.Tensor) and lr.numel() == 1:
            lr = lr.item()
        if lr is None or isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise HastenError(f"checkpoint {i} has no learning rate (got {lr!r}): pass (state_dict or path, lr) pairs")
        if not math.isfinite(lr) or lr < 0:
            raise HastenError(f"checkpoint {i} has learning rate {lr!r}: it must be a finite number >= 0")
        if not isinstance(source, Mapping):
            if not isinstance(source, (str, os.PathLike)):
                raise HastenError(f"checkpoint {i} is a {type(source).__name__}: give a state_dict or a file path")
            if not Path(source).is_file():
                raise HastenError(f"checkpoint file {source} not found")
        out.append((source, float(lr)))
    return out


def read_state_dict(source: Source) -> Mapping[str, torch.Tensor]:
    """The model state_dict held by ``source`` (tensors on the CPU when read from a file)."""
    if isinstance(source, Mapping):
        return _unwrap(source, "state_dict")
    path = Path(source)
    with open(path, "rb") as f:
        head = f.read(8)
    from hasten.train.checkpoint import MAGIC, load_checkpoint

    if head == MAGIC:
        payload = load_checkpoint(path)
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors have many types
            raise HastenError(f"cannot read checkpoint {path} ({type(e).__name__}): expected a hasten checkpoint or "
                              "a torch.save'd state_dict") from None
    if not isinstance(payload, Mapping):
        raise HastenError(f"checkpoint {path} holds a {type(payload).__name__}, not a state_dict")
    return _unwrap(payload, str(path))


def _unwrap(payload: Mapping, name: str) -> Mapping[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(payload.get(key), Mapping):
            payload = payload[key]
            break
    for prefix in PREFIXES:
        if payload and all(isinstance(k, str) and k.startswith(prefix) for k in payload):
            payload = {k[len(prefix):]: v for k, v in payload.items()}
    return payload


def check_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], name: str) -> None:
    """One-line error naming the first key that is missing, unexpected or of another shape."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise HastenError(f"checkpoint {name} does not fit the model: key {missing[0]!r} is missing "
                          "(a checkpoint of another architecture?)")
    extra = [k for k in state if k not in expected]
    if extra:
        raise HastenError(f"checkpoint {name} does not fit the model: unexpected key {extra[0]!r} "
                          "(a checkpoint of another architecture?)")
    for key, ref in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise HastenError(f"checkpoint {name} does not fit the model: key {key!r} has shape {shape}, "
                              f"the model's is {tuple(ref.shape)} (a checkpoint of another architecture?)")

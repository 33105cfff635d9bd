"""Two guards around a gloo exit race in torch (seen with 2.13 in core dumps of 2-rank runs, about 1 in 30 on a
loaded 2-core machine: "terminate called without an active exception", the process killed by SIGABRT at exit).

Gloo runs each collective on a worker thread, which releases its last reference to the work just *after* marking it
complete. If that release has to free a Python object, it takes the GIL; when the main thread has already started
finalizing the interpreter (the script returned within those microseconds to a few milliseconds), taking the GIL
ends the worker thread inside a C++ destructor and the process aborts. Two kinds of Python object were found there:

- the ``contextvars`` context that ``torch.autograd`` keeps in thread-local state during backward, which every
  collective issued during backward captures: :func:`outside_backward_tls` issues collectives without it;
- a tensor's Python object, when the work's reference to the tensor was the last one: :func:`settle_at_exit`
  gives the worker threads the GIL for a moment before the interpreter finalizes.
"""
from __future__ import annotations

import atexit
import contextlib
import time

import torch
import torch.distributed as dist

SETTLE_SECONDS = 0.1  # far longer than a worker thread takes to release a finished work
_settling = False


@contextlib.contextmanager
def outside_backward_tls():
    """Issue collectives (and futures' ``then``) without the Python object torch keeps in thread-local state during
    backward; nothing a collective does needs it."""
    stashed = hasattr(torch._C, "_is_key_in_tls") and torch._C._is_key_in_tls("context")
    saved = torch._C._get_obj_in_tls("context") if stashed else None
    if stashed:
        torch._C._remove_obj_from_tls("context")
    try:
        yield
    finally:
        if stashed:
            torch._C._stash_obj_in_tls("context", saved)


def _settle() -> None:
    time.sleep(SETTLE_SECONDS)  # releases the GIL: a worker thread still finishing a work can take it now


def settle_at_exit(group=None) -> None:
    """Once per process, when ``group`` (default: the default group) runs on gloo: at exit, before the interpreter
    finalizes, let gloo's worker threads finish releasing their last works (:data:`SETTLE_SECONDS`)."""
    global _settling
    if _settling or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend(group) != "gloo":
        return
    _settling = True
    atexit.register(_settle)

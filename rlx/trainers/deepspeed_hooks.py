"""Let instruments take side gradients (`torch.autograd.grad`) of the loss graph under DeepSpeed.

DeepSpeed's engine hooks every output tensor of its forward (`OutputBackwardHookManager`,
deepspeed/runtime/utils.py). The first gradient that reaches one of them runs the engine's backward prologue:
ZeRO enters its backward and queues an epilogue that reduces gradient buckets when that autograd call
ends. An instrument's `torch.autograd.grad(loss, token_logps)` (w_t = dL/dl_t) or `grad(term, hidden)` is not
the training backward. Under ZeRO-2 the epilogue then fails on empty buckets (IndexError in
`reduce_ipg_grads`; docs/distributed.md), and it also marks the prologue done, so the real backward would
skip it. `inert_output_hooks()` makes the live managers pass gradients through untouched and restores them,
so the real `engine.backward` runs them as usual. Without DeepSpeed both functions do nothing.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

_LIVE: weakref.WeakSet = weakref.WeakSet()
_INSTALLED = {"done": False}


def track_output_hooks() -> None:
    """Record each DeepSpeed output-hook manager as it is registered (idempotent; before the forward)."""
    if _INSTALLED["done"]:
        return
    _INSTALLED["done"] = True
    try:
        from deepspeed.runtime.utils import OutputBackwardHookManager
    except Exception:  # deepspeed absent or a version without it: nothing to guard
        return
    original = OutputBackwardHookManager.register_hooks_on_outputs

    def register_hooks_on_outputs(self, outputs):
        _LIVE.add(self)
        return original(self, outputs)

    OutputBackwardHookManager.register_hooks_on_outputs = register_hooks_on_outputs


@contextlib.contextmanager
def inert_output_hooks() -> Iterator[None]:
    """While inside, DeepSpeed's output hooks neither start ZeRO's backward nor rescale gradients."""
    saved = [(m, m.preprocess_done, m.preprocess_per_tensor_fn) for m in list(_LIVE)]
    for m, _, _ in saved:
        m.preprocess_done, m.preprocess_per_tensor_fn = True, None
    try:
        yield
    finally:
        for m, done, per_tensor in saved:
            m.preprocess_done, m.preprocess_per_tensor_fn = done, per_tensor

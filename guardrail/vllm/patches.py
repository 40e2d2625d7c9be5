"""The only place guardrail changes vLLM's own objects; each patch here can be undone.

vLLM offers no hook for what the guard needs beyond a module's forward hooks, so three of
its methods are wrapped:

- ``model.compute_logits`` (one model instance): lets an aborted request's row be forced
  to its ``[guardrail] …`` message and EOS;
- ``runner._update_states`` (one model runner instance): tells the guard how many tokens
  each request has scheduled this step, to find the row that gets sampled;
- ``load_model`` of the model runner classes (``vllm serve``'s plugin): installs the guard
  in the worker right after the weights are loaded.

State these wrappers need lives in guardrail's objects (the guard, this module), never in
attributes added to vLLM's.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

Undo = Callable[[], None]

_PATCHED_CLASSES: set[type] = set()  # runner classes whose load_model is wrapped (subclasses inherit the wrapper, not this)


def _wrap_instance_method(obj: Any, name: str, wrapper: Callable[..., Any]) -> Undo:
    """Replace ``obj.name`` on this instance only; the undo brings back what was there."""
    had_own = name in vars(obj)
    before = vars(obj).get(name)
    setattr(obj, name, wrapper)

    def undo() -> None:
        if had_own:
            setattr(obj, name, before)
        else:
            vars(obj).pop(name, None)

    return undo


def wrap_compute_logits(model: Any, edit: Callable[[Any], Any]) -> Undo:
    """``model.compute_logits`` returns ``edit(logits)`` instead of ``logits``."""
    original = model.compute_logits

    @functools.wraps(original)
    def compute_logits(*args: Any, **kwargs: Any) -> Any:
        return edit(original(*args, **kwargs))

    return _wrap_instance_method(model, "compute_logits", compute_logits)


def watch_scheduled(runner: Any, record: Callable[[dict[str, int]], None]) -> Undo:
    """Call ``record(tokens scheduled per request)`` at the start of every step of ``runner``."""
    original = runner._update_states

    def update_states(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        record(dict(getattr(scheduler_output, "num_scheduled_tokens", {}) or {}))
        return original(scheduler_output, *args, **kwargs)

    return _wrap_instance_method(runner, "_update_states", update_states)


def runner_classes() -> list[type]:
    """The model runner classes of this platform's vLLM (GPU and CPU)."""
    classes = []
    for module, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"), ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")):
        try:
            mod = __import__(module, fromlist=[name])
            classes.append(getattr(mod, name))
        except Exception:  # noqa: BLE001 - a platform without that runner
            continue
    return classes


def after_load_model(after: Callable[[Any], None]) -> None:
    """Call ``after(runner)`` once each model runner has loaded its weights (every runner class, once)."""
    for cls in runner_classes():
        if cls in _PATCHED_CLASSES or "load_model" not in cls.__dict__:
            continue
        cls.load_model = _then(cls.load_model, after)
        _PATCHED_CLASSES.add(cls)


def _then(load_model: Callable[..., Any], after: Callable[[Any], None]) -> Callable[..., Any]:
    @functools.wraps(load_model)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_model(self, *args, **kwargs)
        after(self)
        return result

    return wrapped

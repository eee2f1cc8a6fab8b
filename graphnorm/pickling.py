"""Pickling of parametrized layers (reparam mode), which torch refuses.

``torch.nn.utils.parametrize`` gives a parametrized module a class of its own, created at registration, and
forbids pickling it ("only supported through state_dict()"), so ``torch.save(model)`` of a whole converted model
and sending it to a spawned worker fail. :func:`make_picklable` gives that class a reduction: the layer is
pickled as its plain class with the raw tensors (``parametrizations.<name>.original``) in place of the
parametrized ones, plus its parametrization modules; loading registers them again (``unsafe=True``: they were
checked when first registered). Shared objects (the BatchNorm's gamma and beta, the folded layer's state) stay
shared through the pickle memo.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

__all__ = ["make_picklable"]


def _rebuild(plain: nn.Module, parametrizations: dict[str, list[nn.Module]]) -> nn.Module:
    for name, modules in parametrizations.items():
        for module in modules:
            parametrize.register_parametrization(plain, name, module, unsafe=True)
    make_picklable(plain)
    return plain


def _reduce(layer: nn.Module, protocol: int = 2) -> tuple[Any, ...]:
    cls = parametrize.type_before_parametrizations(layer)
    plain = cls.__new__(cls)
    state = dict(layer.__dict__)
    state["_parameters"] = dict(layer._parameters)
    state["_modules"] = {key: value for key, value in layer._modules.items() if key != "parametrizations"}
    for name, chain in layer.parametrizations.items():
        state["_parameters"][name] = chain.original
    plain.__dict__.update(state)
    return (_rebuild, (plain, {name: list(chain) for name, chain in layer.parametrizations.items()}))


def make_picklable(layer: nn.Module) -> None:
    """Let ``pickle`` (and ``torch.save``) handle a module parametrized with ``torch.nn.utils.parametrize``.
    The reduction is set on the module's own generated class, so no other module is affected."""
    if parametrize.is_parametrized(layer):
        type(layer).__reduce_ex__ = _reduce

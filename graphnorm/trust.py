"""Which code a file may make graphnorm run.

A graphnorm checkpoint names its model as an import spec (``package.module:attr``). Importing a module runs its
top-level code and calling the attribute runs more, so a spec read from a file is data until the user consents.
It is imported only when

- the user trusts the file's code (``trust_code=True``, the CLI's ``--trust-code``), or
- the user named the same spec themselves (the CLI's MODEL argument with the checkpoint as ``--weights``), or
- its module lies in an allow-listed package (:data:`DEFAULT_TRUSTED_PACKAGES`: torchvision, timm,
  graphnorm.zoo, plus any the user adds) **and**, after that trusted import, the attribute is an ``nn.Module``
  subclass or instance, or a registered model factory (torchvision's ``list_models``, timm's model registry).
  Any other callable of an allow-listed package (``torchvision.io:write_file``, ``timm.models:load_checkpoint``)
  is refused without being called.

The package check happens on the spec's text, before anything is imported. A spec that is not a plain dotted
name (``os:abort`` passes this, ``os;rm:x`` does not) is refused as malformed.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .errors import ModelLoadError

__all__ = ["DEFAULT_TRUSTED_PACKAGES", "CodeTrust", "UntrustedCodeError", "split_spec"]

DEFAULT_TRUSTED_PACKAGES = ("torchvision", "timm", "graphnorm.zoo")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class UntrustedCodeError(ModelLoadError):
    """A file names code (an import spec) that graphnorm may not import or call without the user's consent."""


def split_spec(spec: str) -> tuple[str, str]:
    """``package.module:attr`` -> ``("package.module", "attr")``, or a one-line error naming the expected form."""
    module_name, _, attribute = spec.partition(":")
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attribute):
        raise ModelLoadError(f"'{spec}' is not an import spec; write package.module:attr, e.g. "
                             "torchvision.models:resnet18")
    return module_name, attribute


def _within(module_name: str, package: str) -> bool:
    return module_name == package or module_name.startswith(package + ".")


def _registered_factories(package: str) -> list[Any]:
    """Model factories the package registers by name (imported only once the package is trusted)."""
    if package == "torchvision":
        import torchvision.models

        return [torchvision.models.get_model_builder(name) for name in torchvision.models.list_models()]
    if package == "timm":
        import timm.models

        return [timm.models.model_entrypoint(name) for name in timm.list_models()]
    return []


@dataclass(frozen=True)
class CodeTrust:
    """The user's consent for code named by a file: ``trust_code`` (anything), ``confirmed_spec`` (the spec the
    user typed; a file naming exactly this one is confirmed), ``packages`` (allow-listed packages whose model
    classes and registered factories a file may name)."""

    trust_code: bool = False
    confirmed_spec: str | None = None
    packages: tuple[str, ...] = DEFAULT_TRUSTED_PACKAGES

    def with_packages(self, extra: Iterable[str]) -> CodeTrust:
        """The same consent with more allow-listed packages."""
        return CodeTrust(self.trust_code, self.confirmed_spec, (*self.packages, *extra))

    def fully_trusted(self, spec: str) -> bool:
        return self.trust_code or spec == self.confirmed_spec

    def check_before_import(self, spec: str, where: str) -> str:
        """Refuse, before any import, a spec from ``where`` outside consent; returns its allow-listed package
        ('' when fully trusted)."""
        module_name, _ = split_spec(spec)
        if self.fully_trusted(spec):
            return ""
        package = next((p for p in self.packages if _within(module_name, p)), None)
        if package is None:
            top = module_name.split(".")[0]
            raise UntrustedCodeError(
                f"{where} names the model '{spec}'; importing '{module_name}' would run its code and it is not in "
                f"an allow-listed package ({', '.join(self.packages)}). If you trust the file, pass --trust-code, "
                f"or give '{spec}' as MODEL with this file as --weights, or allow the package with "
                f"--allow-package {top}")
        return package

    def check_after_import(self, spec: str, target: Any, package: str, where: str) -> None:
        """For a spec of an allow-listed package: the attribute must be a model class, a module instance or a
        registered model factory, never another callable."""
        if not package:
            return
        if isinstance(target, nn.Module):
            return
        if isinstance(target, type) and issubclass(target, nn.Module):
            return
        if any(target is factory for factory in _registered_factories(package.split(".")[0])):
            return
        raise UntrustedCodeError(
            f"{where} names '{spec}', which is not an nn.Module class or a registered model factory of "
            f"'{package}'; graphnorm does not call it. If you trust the file, pass --trust-code")


def resolve_attribute(module_name: str, attribute: str, spec: str) -> Any:
    """Import ``module_name`` and walk ``attribute`` (dotted); one-line errors for what does not resolve."""
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelLoadError(f"cannot import '{module_name}' for '{spec}' ({err}); is the package installed?"
                             ) from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"'{module_name}' has no attribute '{attribute}' (from '{spec}')")
        target = getattr(target, part)
    return target

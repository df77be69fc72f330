"""Typed option objects, one per method, accepted wherever a method name is:

    init_lora(model, loader, method=FiletOptions(energy="component", route="full"))
    init_lora(model, loader, method=LoraDAOptions(population_size=100_000, damping=1e-4))

Each is a frozen dataclass generated from its method's constructor, so its fields, types and
defaults are exactly the method's options (``help(FiletOptions)`` shows the method's documentation).
"""

from __future__ import annotations

import dataclasses
import inspect

from .methods import METHODS, FILet, Gaussian, KaSA, LoraDA, LoraGA, MiLoRA, PiSSA


class MethodOptions:
    """Base of the generated option classes: ``method`` names the method they configure."""

    method: str = ""

    def to_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _options_class(method_cls, class_name: str) -> type:
    parameters = [p for p in inspect.signature(method_cls.__init__).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY]
    fields = [(p.name, p.annotation, dataclasses.field(default=p.default)) for p in parameters]
    cls = dataclasses.make_dataclass(class_name, fields, bases=(MethodOptions,), frozen=True,
                                     namespace={"method": method_cls.name})
    cls.__doc__ = f"Options of method {method_cls.name!r} (fields: {', '.join(p.name for p in parameters) or 'none'}).\n\n" \
                  + inspect.cleandoc(method_cls.__doc__ or "")
    cls.__module__ = __name__
    return cls


FiletOptions = _options_class(FILet, "FiletOptions")
LoraDAOptions = _options_class(LoraDA, "LoraDAOptions")
LoraGAOptions = _options_class(LoraGA, "LoraGAOptions")
KaSAOptions = _options_class(KaSA, "KaSAOptions")
PiSSAOptions = _options_class(PiSSA, "PiSSAOptions")
MiLoRAOptions = _options_class(MiLoRA, "MiLoRAOptions")
GaussianOptions = _options_class(Gaussian, "GaussianOptions")


def method_and_options(method, method_options: dict) -> tuple[str, dict]:
    """``(method name, options)`` from a method name or an options object (loose keyword options
    may not be mixed with an options object)."""
    if isinstance(method, MethodOptions):
        if method_options:
            raise TypeError(f"give the options either in {type(method).__name__} or as keywords, not both "
                            f"(got {sorted(method_options)})")
        return method.method, method.to_kwargs()
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name ({', '.join(sorted(METHODS))}) or an options object such as "
                        f"FiletOptions(...), got {type(method).__name__}")
    return method, method_options

"""Several LoRAs on one pipeline: each adapter its own scale, and all of them merged into the weights.

Rendering with a StoryMem adapter and a distilled few-step LoRA (:mod:`storymem.distill`) at fixed scales needs
no LoRA layers at run time: :func:`fuse_loras` merges them (peft's ``merge``) and checks the fused output
against the unfused one, so the per-forward cost of unfused adapters (about 11 % at rank 128 + 64) is gone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch

from .lora import AdapterError

__all__ = ["LoraFusionError", "FuseReport", "set_lora_scales", "fuse_loras"]

EXPERTS = ("transformer", "transformer_2")


class LoraFusionError(AdapterError):
    """Adapters that cannot be scaled or fused as asked (their fused output strays from the unfused one)."""


def set_lora_scales(pipe, scales: Mapping[str, Union[float, Mapping[str, float]]],
                    experts: Optional[Sequence[str]] = None) -> None:
    """Activate exactly the adapters in ``scales``, each at its scale, in every expert that has them.

    A scale is a number, or ``{"transformer": s_high, "transformer_2": s_low}`` for one per expert. Adapters of
    a model not named in ``scales`` are switched off there; an adapter no expert has is refused.
    """
    experts = list(experts or EXPERTS)
    models = {e: getattr(pipe, e, None) for e in experts}
    models = {e: m for e, m in models.items() if m is not None}
    known = set().union(*[set(getattr(m, "peft_config", None) or {}) for m in models.values()]) if models else set()
    unknown = sorted(set(scales) - known)
    if unknown:
        raise LoraFusionError(f"no adapter named {unknown} is loaded (loaded: {sorted(known) or 'none'})")
    for expert, model in models.items():
        loaded = set(getattr(model, "peft_config", None) or {})
        names = [n for n in scales if n in loaded]
        if not names:
            if loaded:
                model.disable_lora()
            continue
        model.enable_lora()  # undo an earlier disable_lora, which set_adapters alone would leave in force
        weights = []
        for name in names:
            value = scales[name]
            value = value.get(expert, 1.0) if isinstance(value, Mapping) else value
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LoraFusionError(f"scale of adapter {name!r} for {expert} must be a finite number, got {value!r}")
            weights.append(float(value))
        model.set_adapters(names, weights=weights)


# ---------------------------------------------------------------------------------------------- fusing
@dataclass
class FuseReport:
    """What :func:`fuse_loras` merged, and how far the fused output lies from the unfused one."""

    adapters: dict[str, list[str]]
    relative_error: dict[str, float]
    tolerance: float
    unloaded: bool


def _probe(model, seed: int = 0) -> dict:
    """A small deterministic input for one forward of a Wan expert (4 tokens, 16 text tokens)."""
    cfg = model.config
    p_t, p_h, p_w = cfg.patch_size
    gen = torch.Generator("cpu").manual_seed(seed)
    # The input's dtype is the patch embedding's: diffusers keeps some modules in fp32 beside bf16 weights, and
    # fp8 storage leaves the patch embedding in the compute dtype.
    weight = getattr(getattr(model, "patch_embedding", None), "weight", None)
    param = weight if weight is not None else next(model.parameters())
    dtype = param.dtype if param.dtype.is_floating_point and param.dtype.itemsize > 1 else torch.bfloat16
    hidden = torch.randn(1, cfg.in_channels, p_t, 2 * p_h, 2 * p_w, generator=gen)
    text = torch.randn(1, 16, cfg.text_dim, generator=gen)
    from diffusers.utils.torch_utils import get_module_execution_device

    device = get_module_execution_device(model)
    return dict(hidden_states=hidden.to(device, dtype), timestep=torch.tensor([500.0], device=device),
                encoder_hidden_states=text.to(device, dtype), return_dict=False)


def _relative(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after.float() - before.float()).norm() / before.float().norm().clamp_min(1e-12))


@torch.no_grad()
def fuse_loras(pipe, adapter_names: Optional[Sequence[str]] = None, check: bool = True,
               tolerance: Optional[float] = None, device: Union[str, torch.device, None] = None,
               unload: bool = True, experts: Optional[Sequence[str]] = None) -> FuseReport:
    """Merge the active adapters (at the scales :func:`set_lora_scales` gave them) into the experts' weights.

    ``check``: the fused output against the unfused one, as a relative L2 difference; above ``tolerance``
    (default 5% for 16-bit weights, where merging rounds each weight once, 1e-4 in float32) everything is
    unmerged and :class:`LoraFusionError` raised. Checked on one probe forward of each expert, or, with
    ``device``, layer by layer there (each layer on a random input), so weights kept on the CPU are merged and
    checked on e.g. "cuda" one layer at a time. ``unload``: drop the LoRA layers afterwards (no per-forward cost
    or memory left; scales can then no longer change, and the adapters can no longer be switched off).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    report = FuseReport({}, {}, tolerance or 0.0, unload)
    for expert in experts or EXPERTS:
        model = getattr(pipe, expert, None)
        if model is None or not getattr(model, "peft_config", None):
            continue
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if any(layer.disable_adapters for layer in layers):
            continue  # switched off: nothing to merge
        active = sorted({n for layer in layers for n in layer.active_adapters
                         if adapter_names is None or n in adapter_names})
        if not active:
            continue
        # The merged weights' own dtype decides the rounding (fp32 modules may sit beside bf16 layers).
        dtype = layers[0].get_base_layer().weight.dtype
        tol = tolerance if tolerance is not None else (1e-4 if dtype == torch.float32 else 0.05)
        probe = _probe(model) if check and device is None else None
        before = model(**probe)[0] if probe is not None else None
        error = 0.0
        gen = torch.Generator("cpu").manual_seed(0)
        for layer in layers:
            home = next(layer.parameters()).device
            if device is not None:
                layer.to(device)
            weight = layer.get_base_layer().weight
            x = torch.randn(4, weight.shape[1], generator=gen).to(weight.device, weight.dtype) \
                if check and device is not None else None
            layer_before = layer(x) if x is not None else None
            layer.merge(safe_merge=True, adapter_names=active)
            if x is not None:
                error = max(error, _relative(layer(x), layer_before))
            if device is not None:
                layer.to(home)
        if probe is not None:
            error = _relative(model(**probe)[0], before)
        if check:
            report.relative_error[expert] = error
            if not math.isfinite(error) or error > tol:
                for layer in layers:
                    layer.unmerge()
                raise LoraFusionError(f"{expert}: fused output differs from unfused by {error:.3g} (relative), "
                                       f"above {tol:g}; adapters left unfused")
        report.adapters[expert] = active
        report.tolerance = max(report.tolerance, tol)
        if unload:
            model.unload_lora()
    return report

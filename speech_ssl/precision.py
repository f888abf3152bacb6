"""Which arithmetic a run uses: ``precision=auto|fp32|bf16|fp16``, resolved once per device (torch only).

* GPUs: ``auto`` is bf16 autocast where the GPU supports it, else fp16 (with a gradient scaler when
  training).
* CPUs: ``auto`` is bf16 autocast where the CPU has native bf16 dot products (AMX on recent Xeons,
  avx512_bf16 on Zen 4 and Cooper Lake, the ``bf16`` extension on Arm), where a bf16 matrix product runs
  several times faster than fp32; elsewhere bf16 is emulated and slower than fp32, so ``auto`` is fp32.
  ``bf16`` forces it anyway (with a warning where it is emulated); fp16 is never used on CPUs.

Training, fine-tuning, evaluation and embedding all resolve precision here, so the choice and its
log line are the same everywhere. torch is imported when a precision is resolved, not with this module:
the configs that declare ``precision_field()`` stay light to import (``speech-ssl --help``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from dataclasses import field
from typing import TYPE_CHECKING, Any, ContextManager

from speech_ssl.config import ConfigError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

log = logging.getLogger("speech_ssl.precision")


def precision_field() -> Any:
    """The ``precision`` setting of a stage's config: ``auto`` by default, checked against PRECISIONS."""
    return field(default="auto", metadata={"choices": list(PRECISIONS)})


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def cpu_bf16_features() -> tuple[str, ...]:
    """The native bf16 features of this CPU (empty when bf16 would be emulated)."""
    import torch

    found = []
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for name, probe in probes.items():
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                found.append(name)
        except Exception:  # an older torch without the probe: fall back to the kernel's flags
            pass
    flags = _cpu_flags()
    for name in ("amx_bf16", "avx512_bf16"):
        if name in flags and name not in found:
            found.append(name)
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags:
        found.append("arm_bf16")
    return tuple(found)


def describe_cpu() -> str:
    """One line naming the CPU's vector unit and bf16 support (printed by the benchmarks)."""
    import torch

    features = cpu_bf16_features()
    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = f"native bf16 ({', '.join(features)})" if features else "no native bf16"
    return f"{platform.processor() or platform.machine()}, torch CPU capability {capability}, {bf16}"


def resolve_precision(requested: str, device: torch.device | str, key: str = "precision") -> str:
    """``auto`` -> what the device does fastest; an explicit choice -> itself (fp16 on a CPU: refused).

    ``key`` names the setting in error messages (``trainer.precision``, ``precision``).
    """
    import torch

    if requested not in PRECISIONS:
        raise ConfigError(key, f"unknown precision {requested!r}.", PRECISIONS)
    device = torch.device(device)
    if device.type == "cuda":
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if device.type != "cpu":
        return "fp32" if requested == "auto" else requested
    features = cpu_bf16_features()
    if requested == "fp16":
        raise ConfigError(key, "fp16 is not used on CPUs (no fast fp16 arithmetic there); use bf16 on CPUs "
                               "with native bf16, else fp32.", PRECISIONS)
    if requested == "auto":
        chosen = "bf16" if features else "fp32"
        log.debug("precision=auto on this CPU: %s (%s)", chosen,
                 f"native bf16: {', '.join(features)}" if features else "no native bf16 dot products")
        return chosen
    if requested == "bf16" and not features:
        log.warning("precision=bf16 on a CPU without native bf16: it is emulated and slower than fp32")
    return requested


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)

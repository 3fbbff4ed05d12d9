"""Where a stage computes: the GPU only when a test on the device itself passed.

A package that *could* use a GPU is not a GPU. ``faiss.get_num_gpus()`` is 0
without a driver, and ONNX Runtime's ``get_available_providers()`` lists CUDA on
any host with onnxruntime-gpu installed, driver or not. So each stage probes its
device for real (``candidate.device.faiss_gpu``, ``ranker.device.onnx_cuda``) and
:func:`decide` turns the configured ``device`` and the probe into one answer at
start-up, logged once: ``gpu`` refuses to start without a working device,
``auto`` falls back to the CPU defaults and says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sieve.errors import ConfigError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "gpu"]


@dataclass(frozen=True)
class Probe:
    """What a probe of a device found: ``usable``, and in ``detail`` either what it
    got (the device and the check that passed) or why not, in words a person can
    act on."""

    usable: bool
    detail: str
    gpu_build: bool = True
    """The GPU build of the library is installed (the gpu extra): when it is and the
    device is still not usable, the fallback is a warning; with the cpu extra it is
    the expected path and only said at info level."""


def decide(key: str, asked: Device, probe: Callable[[], Probe], cpu_defaults: str) -> bool:
    """Whether the stage configured by ``key`` (e.g. ``candidate.device``) runs on
    its GPU; logs what was asked, what was got and why.

    Args:
        asked: the configured device.
        probe: tests the device for real (not called for ``cpu``).
        cpu_defaults: what the CPU path changes, for the log line (e.g.
            "retrieve batching off").

    Raises:
        ConfigError: ``asked`` is ``gpu`` and the probe found no usable device.
    """
    if asked == "cpu":
        log.info("%s = 'cpu': on the CPU as configured; %s", key, cpu_defaults)
        return False
    found = probe()
    if found.usable:
        log.info("%s = %r: on the GPU (%s)", key, asked, found.detail)
        return True
    if asked == "gpu":
        raise ConfigError(
            f"{key} is 'gpu' but {found.detail}; run on a host with an NVIDIA GPU and the "
            "gpu extra, or set it to 'auto' or 'cpu'"
        )
    log.log(
        logging.WARNING if found.gpu_build else logging.INFO,
        "%s = 'auto': on the CPU, no usable GPU (%s); %s",
        key,
        found.detail,
        cpu_defaults,
    )
    return False

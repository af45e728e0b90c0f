"""GPU figures on ``/metrics``, read from NVML (nvidia-ml-py) at each scrape.

Without the ``pynvml`` module, without the NVIDIA driver's ``libnvidia-ml``, or without a GPU,
the collector exports nothing and never fails a scrape: a CPU host's ``/metrics`` simply has no
``appliance:gpu_*`` series. NVML is initialised once, on the first scrape, and a host where that
fails is not asked again (a driver does not appear under a running server).

The NVML part is :func:`read_gpus`, kept small; everything else works on its plain readings.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

UTILIZATION: Final = "appliance:gpu_utilization_ratio"
MEMORY_USED: Final = "appliance:gpu_memory_used_bytes"
MEMORY_TOTAL: Final = "appliance:gpu_memory_total_bytes"
METRIC_NAMES: Final = (UTILIZATION, MEMORY_USED, MEMORY_TOTAL)
_LABELS: Final = ("gpu", "uuid", "name")


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    utilization: float  # 0..1: the share of the last sample period a kernel ran
    memory_used: int  # bytes
    memory_total: int  # bytes


def read_gpus(nvml: Any) -> list[GpuReading]:
    """One reading per GPU NVML sees (``nvml``: the initialised ``pynvml`` module)."""
    readings = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        readings.append(
            GpuReading(
                index=index,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                name=_text(nvml.nvmlDeviceGetName(handle)),
                utilization=int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0,
                memory_used=int(memory.used),
                memory_total=int(memory.total),
            )
        )
    return readings


def families(readings: Sequence[GpuReading]) -> list[GaugeMetricFamily]:
    """The exported families; with no readings, the same families without samples."""
    utilization = GaugeMetricFamily(
        UTILIZATION, "GPU busy share over NVML's last sample period (1 = 100 %).", labels=_LABELS
    )
    used = GaugeMetricFamily(MEMORY_USED, "GPU memory in use, all processes.", labels=_LABELS)
    total = GaugeMetricFamily(MEMORY_TOTAL, "GPU memory installed.", labels=_LABELS)
    for r in readings:
        labels = [str(r.index), r.uuid, r.name]
        utilization.add_metric(labels, r.utilization)
        used.add_metric(labels, r.memory_used)
        total.add_metric(labels, r.memory_total)
    return [utilization, used, total]


class GpuCollector(Collector):
    """A prometheus-client collector of :func:`read_gpus`; nothing without NVML or a GPU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._tried = False
        self.unavailable: str | None = None  # why nothing is exported, once known

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return families(())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return
            try:
                readings = read_gpus(nvml)
            except nvml.NVMLError as exc:  # a GPU fell off the bus: say so, fail no scrape
                log.warning("reading the GPUs failed: %s", exc)
                return
        yield from (family for family in families(readings) if family.samples)

    def _init(self) -> Any:
        if self._tried:
            return self._nvml
        self._tried = True
        try:
            import pynvml  # noqa: PLC0415 - optional (the [gpu] extra), and only when scraped
        except ImportError:
            self.unavailable = "nvidia-ml-py is not installed"
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.unavailable = f"NVML: {exc}"
            return None
        self._nvml = pynvml
        return pynvml


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value

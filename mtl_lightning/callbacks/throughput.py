"""Training throughput after a warm-up: samples/s, tokens/s, peak accelerator memory and model FLOPs utilisation.

Why not Lightning's ``ThroughputMonitor`` (``lightning.pytorch.callbacks``): it reports only through a logger and
only on logging steps, while a benchmark runs without a logger and needs the numbers in a file; it reads
``flops_per_batch`` off the LightningModule, while here the FLOPs belong to the encoder chosen in YAML; its MFU
divides by the peak of the run's own precision (fp32/tf32 for ``32-true``, the reduce dtype under FSDP) from a
table that mixes dense and sparse peaks (dense for H100 SXM, sparse for H200 and H100 NVL), while variants are
compared here against one denominator, the device's dense bf16 peak; it synchronises CUDA after every batch, which
removes the CPU/GPU overlap being measured; and it reports nothing until its 100-batch window is full. Its
``get_available_flops`` is still the fallback for devices the small table below does not name.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mtl_lightning.contracts import SupportsFlopsPerSample

# Dense (no sparsity) bf16 tensor-core peaks, matched in order on the lower-cased CUDA device name. NVIDIA's data
# sheets print the 2:4-sparsity figures (twice these) in the headline columns.
DENSE_BF16_PEAKS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h200", "nvl"), 835.5e12),
    (("h200",), 989.4e12),  # H200 SXM: the same tensor cores and clocks as the H100 SXM, more memory
    (("h100", "nvl"), 835.5e12),
    (("h100", "pcie"), 756.0e12),
    (("h100",), 989.4e12),  # H100 SXM ("NVIDIA H100 80GB HBM3")
)


def dense_bf16_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for keys, peak in DENSE_BF16_PEAKS:
        if all(k in name for k in keys):
            return peak
    from lightning.fabric.utilities.throughput import get_available_flops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for unknown devices; None says the same
        available = get_available_flops(device, torch.bfloat16)
    return float(available) if available else None


def model_flops_per_sample(pl_module: LightningModule) -> tuple[int, str]:
    """Training (forward + backward) matmul FLOPs per sample and how they were counted.

    ``encoder.flops_per_sample()`` when the encoder has it (:class:`~mtl_lightning.contracts.SupportsFlopsPerSample`;
    the Transformer's counts attention too), else
    ``6 * encoder parameters`` (2 FLOPs per weight for the forward, 4 for the backward: exact for an MLP); the
    heads always add ``6 * their parameters``.
    """
    # The LightningModule's `encoder` and `heads` (MultiTaskModule's; any other module is counted as a whole).
    encoder = getattr(pl_module, "encoder", None)
    heads = getattr(pl_module, "heads", None)
    head_params = sum(p.numel() for p in heads.parameters()) if isinstance(heads, torch.nn.Module) else 0
    if isinstance(encoder, SupportsFlopsPerSample):
        flops = int(encoder.flops_per_sample())
        return flops + 6 * head_params, f"{type(encoder).__name__}.flops_per_sample() + 6 * head params"
    module = encoder if isinstance(encoder, torch.nn.Module) else pl_module
    params = sum(p.numel() for p in module.parameters())
    return 6 * (params + head_params), "6 * (encoder + head) params"


def _batch_size_and_tokens(batch: Any) -> tuple[int, int | None]:
    """Samples in a batch ``{"inputs": ...}``, and its tokens when the inputs are integer ids ``(N, S)``."""
    inputs = batch["inputs"] if isinstance(batch, Mapping) and "inputs" in batch else batch
    first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
    tokens = first.numel() if first.ndim == 2 and not first.is_floating_point() else None
    return int(first.shape[0]), tokens


class ThroughputTimer(Callback):
    """Time the training batches after ``warmup`` of them and write the result as JSON (rank 0) and one log line.

    Only the two ends of the timed window synchronise the accelerator, so the CPU keeps queueing work ahead of the
    GPU as in a normal run. The warm-up batches are timed one by one (synchronised): with ``torch.compile`` the
    first of them holds the compilation. Throughput is per device (rank 0's batches); ``samples_per_s_global``
    multiplies by the world size. MFU = model FLOPs per second / the device's dense bf16 peak, whatever the
    precision of the run, so that variants are compared on one scale.

    Args:
        out: JSON file to write (its folder is created); None only logs the summary line.
        warmup: Training batches excluded from the measurement (compilation, allocator and cuDNN warm-up).
        steps: Timed batches; None times every batch after the warm-up until training stops.
        peak_flops: Peak FLOP/s of one device for MFU; default: the dense bf16 peak of the device, if known.
    """

    def __init__(
        self, out: str | None = None, warmup: int = 5, steps: int | None = None, peak_flops: float | None = None
    ):
        super().__init__()
        if warmup < 0 or (steps is not None and steps < 1):
            raise ValueError(f"ThroughputTimer: warmup must be >= 0 and steps >= 1, got {warmup} and {steps}")
        self.out = out
        self.warmup = warmup
        self.steps = steps
        self.peak_flops = peak_flops
        self.result: dict[str, Any] = {}

    def _now(self, trainer: Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Counted here, before configure_model and the strategy can shard or compile the modules.
        self._flops_per_sample, self._flops_method = model_flops_per_sample(pl_module)
        self._params = sum(p.numel() for p in pl_module.parameters())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._batches = self._samples = self._tokens = 0
        self._has_tokens = True
        self._warmup_times: list[float] = []
        self._t_window: float | None = None
        self._t_end: float | None = None
        self._t_start = self._last = self._now(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._t_end is not None:
            return
        self._batches += 1
        if self._batches <= self.warmup:
            now = self._now(trainer)
            self._warmup_times.append(now - self._last)
            self._last = now
            if self._batches == self.warmup:
                self._t_window = now
            return
        if self._t_window is None:  # warmup == 0: the window starts at the start of training
            self._t_window = self._t_start
        samples, tokens = _batch_size_and_tokens(batch)
        self._samples += samples
        self._has_tokens &= tokens is not None
        self._tokens += tokens or 0
        if self.steps is not None and self._batches == self.warmup + self.steps:
            self._t_end = self._now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._t_end is None:
            self._t_end = self._now(trainer)
        self.result = self._summary(trainer)
        if not trainer.is_global_zero:
            return
        if self.out:
            path = Path(self.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.result, indent=2))
        r = self.result
        if r["timed_steps"]:
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
            mem = f", peak memory {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else ""
            rank_zero_info(
                f"ThroughputTimer: {r['samples_per_s']:.1f} samples/s, {r['step_ms']:.2f} ms/step over "
                f"{r['timed_steps']} steps{mem}{mfu}"
            )
        else:
            rank_zero_info(f"ThroughputTimer: training stopped after {self._batches} batches, within the warm-up")

    def _summary(self, trainer: Trainer) -> dict[str, Any]:
        device = trainer.strategy.root_device
        timed = max(0, self._batches - self.warmup)
        started, ended = self._t_window, self._t_end
        window = (ended - started) if timed and started is not None and ended is not None else None
        samples_per_s = self._samples / window if window else None
        peak = self.peak_flops or dense_bf16_peak_flops(device)
        flops_per_s = samples_per_s * self._flops_per_sample if samples_per_s else None
        cuda = device.type == "cuda"
        return {
            "device": torch.cuda.get_device_name(device) if cuda else device.type,
            "precision": str(trainer.precision),
            "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size,
            "params": self._params,
            "warmup_steps": min(self._batches, self.warmup),
            "timed_steps": timed,
            "window_s": window,
            "first_step_s": self._warmup_times[0] if self._warmup_times else None,
            "warmup_s": sum(self._warmup_times) if self._warmup_times else None,
            "step_ms": 1000 * window / timed if window else None,
            "samples_per_s": samples_per_s,
            "samples_per_s_global": samples_per_s * trainer.world_size if samples_per_s else None,
            "tokens_per_s": self._tokens / window if window and self._has_tokens else None,
            "flops_per_sample": self._flops_per_sample,
            "flops_method": self._flops_method,
            "achieved_tflops": flops_per_s / 1e12 if flops_per_s else None,
            "peak_tflops": peak / 1e12 if peak else None,
            "mfu": flops_per_s / peak if flops_per_s and peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        }

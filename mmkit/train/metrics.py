"""Training metrics: JSONL file, TensorBoard events, a console line and a tqdm progress bar with ETA.

The trainer calls `logger.step({...})` once per optimizer step with the raw numbers it has; the logger
derives rates, MFU and peak memory, and writes every `log_interval` steps (and at the last step).
Only rank 0 writes anything. One JSONL line per logged step:
`{"step", "loss", "grad_norm", "lr", "step_time_s", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_mb", ...}`
plus any extra numeric keys the trainer passed (e.g. loss parts). On resume (`start_step > 0`) the
file is appended to, so steps redone after the last checkpoint appear twice; readers (`mmkit plot`)
keep the last line per step.

MFU = achieved FLOP/s / (peak FLOP/s of one device x world size). The trainer gives the analytic
FLOPs of one optimizer step summed over all processes (forward + backward, e.g. ~6 x params x tokens
for a transformer). The peak per device comes from `logging.peak_tflops`, else `PEAK_TFLOPS` by
device name (dense tensor-core numbers from the vendors' data sheets), else, on CPU, one timed
4096x4096 matmul in the compute dtype (measured once per process and dtype, ~1-2 s).
Peak memory: `max_memory_allocated` on CUDA/NPU, the process's peak RSS on CPU.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense peak TFLOP/s per device: (bf16, fp32). fp32 is the non-tensor-core rate (TF32 off, torch's default).
# Sources: NVIDIA A100, H100 (SXM5 / PCIe / NVL), H200 data sheets; Huawei Ascend 910B (fp16/bf16 ~313).
PEAK_TFLOPS: dict[str, tuple[float, float | None]] = {
    "h200": (989.0, 67.0),
    "h100 nvl": (835.0, 60.0),
    "h100 pcie": (756.0, 51.0),
    "h100": (989.0, 67.0),  # SXM5
    "a100": (312.0, 19.5),
    "910b": (313.0, None),  # Ascend 910B: no public fp32 figure; set logging.peak_tflops
}
_CPU_PEAK_CACHE: dict[torch.dtype, float] = {}


def device_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one device for `dtype` (bf16/fp16 -> tensor-core rate, fp32 -> fp32 rate); None if unknown.

    CPU: measured once per process with a matmul of up to 4096x4096 (best of 2 after a warm-up): the size
    doubles from 256 while a product takes under 0.1 s, so a CPU without fast kernels for `dtype` (bf16
    without AVX512-BF16 runs ~50x slower than fp32) is measured in seconds, not minutes.
    Example: `device_peak_flops("cuda", torch.bfloat16)` -> `989e12` on an H100 SXM.
    """
    device = torch.device(device)
    if device.type == "cpu":
        if dtype not in _CPU_PEAK_CACHE:
            n = 256
            flops = measure_matmul_flops(n, dtype)
            while n < 4096 and 2 * n**3 / flops < 0.1:
                n *= 2
                flops = measure_matmul_flops(n, dtype)
            _CPU_PEAK_CACHE[dtype] = flops
        return _CPU_PEAK_CACHE[dtype]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
    elif device.type == "npu":
        name = torch.npu.get_device_name(device).lower()  # type: ignore[attr-defined]
    else:
        return None
    for key, (low, fp32) in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            tflops = fp32 if dtype == torch.float32 else low
            return None if tflops is None else tflops * 1e12
    return None


def measure_matmul_flops(n: int = 4096, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """FLOP/s of an n x n x n matmul on `device` (2 n^3 FLOPs), best of two timed runs after a warm-up.

    Example: `measure_matmul_flops(1024)` -> about 1.8e11 on a 2-core CPU.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up (thread pool, kernel selection)
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.accelerator.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory of this process in MiB: accelerator max_memory_allocated, or peak RSS on CPU.

    Example: `peak_memory_mb("cpu")` -> e.g. `812.4`.
    """
    device = torch.device(device)
    if device.type in ("cuda", "npu", "xpu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**20
    import resource  # POSIX only; CPU training on Windows is not a target

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


class MetricsLogger:
    """Writes training metrics (see module docstring). Rank 0 only; other ranks get a silent logger.

    Args:
        cfg: a `LoggingConfig` (log_interval, metrics_file, tensorboard_dir, log_tps, peak_tflops, progress_bar).
        total_steps: train.steps (progress bar length, the last step is always logged).
        start_step: steps already done (resume): the bar starts there and the JSONL is appended to.
        device: where the model runs (peak FLOP/s and memory).
        compute_dtype: torch.bfloat16 with train.mixed_precision=bf16, else torch.float32 (for the peak).
        world_size: processes (MFU divides by world_size x the per-device peak). Default: torch.distributed's.
        rank: default torch.distributed's rank, else 0.

    Example:
        >>> log = MetricsLogger(cfg.logging, cfg.train.steps, device="cpu")
        >>> log.step({"step": 1, "loss": 0.5, "grad_norm": 1.2, "lr": 1e-4, "step_time_s": 0.8,
        ...           "samples": 8, "tokens": 4096, "flops": 3.1e12})
        >>> log.close()
    """

    def __init__(
        self,
        cfg,
        total_steps: int,
        start_step: int = 0,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        world_size: int | None = None,
        rank: int | None = None,
    ):
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist_on else 0)
        self.world_size = world_size or (torch.distributed.get_world_size() if dist_on else 1)
        self.cfg, self.total_steps, self.device, self.compute_dtype = (
            cfg,
            total_steps,
            torch.device(device),
            compute_dtype,
        )
        self.enabled = self.rank == 0
        self._peak: float | None | bool = False  # False = not looked up yet
        self._jsonl = self._tb = self._bar = None
        if not self.enabled:
            return
        if cfg.metrics_file:
            path = Path(cfg.metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(path, "a" if start_step > 0 else "w")  # noqa: SIM115 (closed in close())
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                log_dir=cfg.tensorboard_dir, purge_step=start_step + 1 if start_step else None
            )
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def peak_flops(self) -> float | None:
        """Peak FLOP/s of one device (config override, table, or CPU measurement), looked up once."""
        if self._peak is False:
            if self.cfg.peak_tflops:
                self._peak = self.cfg.peak_tflops * 1e12
            else:
                self._peak = device_peak_flops(self.device, self.compute_dtype)
                if self._peak is None:
                    self._print(
                        f"MFU: no peak FLOP/s known for {self.device}; set logging.peak_tflops to report it"
                    )
        return self._peak  # type: ignore[return-value]

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def derive(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The JSONL record for one step: the trainer's numbers plus samples/s, tokens/s, MFU, peak memory.

        Inputs (optional unless noted): step (required), loss (required), grad_norm, lr, step_time_s,
        samples, tokens (this optimizer step, all processes), flops (this step, all processes).
        Example: `log.derive({"step": 1, "loss": 0.5, "step_time_s": 2.0, "samples": 8})["samples_per_s"]` -> `4.0`.
        """
        m = dict(metrics)
        for key in ("step", "loss"):
            if key not in m:
                raise KeyError(f"MetricsLogger.step: metrics need {key!r}")
        dt = m.get("step_time_s")
        rate = lambda n: None if n is None or not dt else n / dt  # noqa: E731
        samples, tokens, flops = m.pop("samples", None), m.pop("tokens", None), m.pop("flops", None)
        peak = self.peak_flops() if flops is not None and dt else None
        out = {
            "step": int(m.pop("step")),
            "loss": float(m.pop("loss")),
            "grad_norm": m.pop("grad_norm", None),
            "lr": m.pop("lr", None),
            "step_time_s": m.pop("step_time_s", None),
            "samples_per_s": rate(samples),
            "tokens_per_s": rate(tokens),
            "mfu": None if not peak else flops / dt / (peak * self.world_size),
            "peak_mem_mb": peak_memory_mb(self.device),
        }
        out.update(m)  # extra numbers from the trainer (loss parts, skipped samples, ...)
        return out

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_interval == 0 or step == self.total_steps

    def step(self, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """Advance the progress bar; on logged steps write JSONL, TensorBoard and a console line.

        Returns the record written (None on ranks other than 0 and on steps that are not logged).
        """
        if not self.enabled:
            return None
        step = int(metrics["step"])
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
        if not self.should_log(step):
            return None
        rec = self.derive(metrics)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        self._print(self.format_line(rec))
        return rec

    def format_line(self, rec: dict[str, Any]) -> str:
        """The console line for one record. Example: `step 10/100 | loss 0.1234 | grad 1.23 | lr 1.00e-04 | ...`."""
        parts = [
            f"step {rec['step']}/{self.total_steps}",
            f"loss {rec['loss']:.4f}",
            f"grad {_fmt(rec['grad_norm'], '.3g')}",
            f"lr {_fmt(rec['lr'], '.2e')}",
            f"{_fmt(rec['step_time_s'], '.3f')} s/step",
            f"{_fmt(rec['samples_per_s'], '.2f')} samples/s",
        ]
        if self.cfg.log_tps:
            parts.append(f"{_fmt(rec['tokens_per_s'], '.0f')} tok/s")
        parts.append(f"mfu {'n/a' if rec['mfu'] is None else format(100 * rec['mfu'], '.1f') + '%'}")
        parts.append(f"mem {rec['peak_mem_mb']:.0f} MB")
        return " | ".join(parts)

    def close(self) -> None:
        """Flush and close the files and the bar (safe to call twice)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a crashed trainer still leaves complete JSONL lines
        try:
            self.close()
        except Exception:
            pass


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """JSONL metrics -> records sorted by step, keeping the last line of a step written twice (resume).

    Example: `[r["loss"] for r in read_metrics("outputs/run/metrics.jsonl")]`.
    """
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # a line cut by a kill mid-write: only the very last line can be partial
                continue
            if "step" not in rec:
                raise ValueError(f"{path}:{n}: metrics line without a 'step' field")
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]

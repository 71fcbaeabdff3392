"""Training metrics in torchtitan's style: FLOPs per token, throughput and MFU, memory, a JSONL log and a loss plot.

FLOPs follow PaLM (appendix B) and torchtitan: ``6·N + 12·L·H·Q·T`` per token, where N counts every parameter
except the embedding lookup tables (a lookup is not a matmul), L is the number of layers, H·Q the query heads
times head size and T the sequence length. An ``lm_head`` tied to the embedding is still counted in N, since its
matmul is real compute. Activation recomputation is not counted: MFU measures useful model FLOPs.

Example:
    >>> from hf_optim.training.metrics import ThroughputMeter, flops_per_token
    >>> meter = ThroughputMeter(flops_per_token(model.config, seq_len=2048), dtype="bf16")
    >>> meter.update(num_tokens=global_tokens_this_step)
    >>> meter.read()  # {'tokens_per_s': ..., 'tflops_per_device': ..., 'mfu': ..., 'elapsed_s': ...}
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_optim.core.errors import ConfigError
from hf_optim.core.modeling import meta_model

PEAK_TFLOPS_ENV = "HF_OPTIM_PEAK_TFLOPS"

# Dense peaks (no 2:4 sparsity) in TFLOP/s from NVIDIA's datasheets; bf16 and fp16 share the tensor-core rate.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "tf32": 494.5, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "tf32": 378.0, "fp32": 51.0},
}
PEAK_TFLOPS["H200"] = PEAK_TFLOPS["H100 SXM"]  # same compute die and clocks; only the memory differs

_DTYPE_NAMES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "no": "fp32", "tf32": "tf32",
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16", "fp8": "fp8",
}
_GIB = 1024**3


def _dtype_key(dtype: torch.dtype | str, device: torch.device | None = None) -> str:
    """One of fp32, tf32, bf16, fp16, fp8; fp32 on a CUDA device counts as tf32 when TF32 matmuls are enabled."""
    if isinstance(dtype, torch.dtype):
        name = "fp8" if "float8" in str(dtype) else str(dtype).removeprefix("torch.")
    else:
        name = str(dtype).lower()
    key = _DTYPE_NAMES.get(name)
    if key is None:
        raise ConfigError(f"Unknown dtype {dtype!r} for peak FLOPs; use one of fp32, tf32, bf16, fp16, fp8.")
    on_cuda = device is not None and device.type == "cuda"
    if key == "fp32" and on_cuda and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return key


def _resolve_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but CUDA is not available here; pass device='cpu'.")
    return device


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a causal LM built from ``config``.

    ``config`` is a transformers ``PretrainedConfig`` or a dict with ``model_type`` (as in a recipe's
    ``model_config``). Parameters are counted on the meta device, so no weights are allocated. Causal masking
    and sliding windows are not discounted in the attention term (PaLM / torchtitan convention). For a
    mixture-of-experts model N counts every expert, so the result overstates the compute of one token.

    Example:
        >>> from transformers import AutoConfig
        >>> config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        >>> flops_per_token(config, seq_len=128)  # 6 * 106_816 non-embedding params + 12 * 2 * 4 * 16 * 128
        837504.0
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, dict):
        if "model_type" not in config:
            raise ConfigError(f"A config dict needs 'model_type' (e.g. 'llama'); got keys {sorted(config)}.")
        config = AutoConfig.for_model(**config)
    if not isinstance(config, PretrainedConfig):
        raise ConfigError(f"flops_per_token needs a PretrainedConfig or a dict, got {type(config).__name__}.")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r} must be a positive integer.")
    text = config.get_text_config()
    layers = _first_attr(text, ("num_hidden_layers", "n_layer"))
    heads = _first_attr(text, ("num_attention_heads", "n_head"))
    head_dim = getattr(text, "head_dim", None) or _first_attr(text, ("hidden_size", "n_embd")) // heads

    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    tables = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    tied_head = tables.get(id(head.weight), 0) if head is not None else 0
    non_embedding = total - sum(tables.values()) + tied_head
    return float(6 * non_embedding + 12 * layers * heads * head_dim * seq_len)


def _first_attr(config: Any, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"{type(config).__name__} has none of {names}; cannot compute FLOPs for this architecture.")


def lookup_peak_tflops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense peak TFLOP/s of a GPU from its name (as ``torch.cuda.get_device_name`` gives it), or None if unknown.

    Example:
        >>> lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
        989.0
    """
    name = device_name.lower()
    if "nvl" in name:  # NVL parts run lower clocks than the SXM figures; not in the table
        return None
    if "h100" in name:
        model = "H100 PCIe" if "pcie" in name else "H100 SXM"
    elif "h200" in name:
        model = "H200"
    elif "a100" in name:
        model = "A100"  # PCIe and SXM A100s share the tensor-core peak
    else:
        return None
    return PEAK_TFLOPS[model].get(_dtype_key(dtype))


_CPU_PEAK_CACHE: dict[str, float] = {}


def _measured_cpu_peak(key: str, size: int = 1024, budget_s: float = 0.5) -> float:
    """Best throughput of a square matmul in this dtype, with the current torch thread count, cached per process."""
    if key not in _CPU_PEAK_CACHE:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[key]
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.matmul(a, b)  # warm-up: first call pays for kernel selection and page faults
        best, deadline, calls = math.inf, time.perf_counter() + budget_s, 0
        while calls < 2 or time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.matmul(a, b)
            best, calls = min(best, time.perf_counter() - start), calls + 1
        _CPU_PEAK_CACHE[key] = 2 * size**3 / best
    return _CPU_PEAK_CACHE[key]


def peak_flops(device: torch.device | str | int | None = None, dtype: torch.dtype | str = "bf16") -> float | None:
    """Peak FLOP/s of one device for ``dtype``, or None when unknown.

    ``HF_OPTIM_PEAK_TFLOPS`` (TFLOP/s) overrides everything. CUDA devices use :data:`PEAK_TFLOPS`. On CPU there
    is no datasheet figure, so the peak is the best measured matmul throughput in that dtype (fp32, bf16 or fp16;
    about 0.5 s, once per process): CPU MFU is relative to that measured peak, not to a vendor number.

    Example:
        >>> peak_flops("cpu", "fp32") > 1e9
        True
    """
    device = _resolve_device(device)
    key = _dtype_key(dtype, device)
    override = os.environ.get(PEAK_TFLOPS_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ConfigError(f"{PEAK_TFLOPS_ENV}={override!r} must be a positive number of TFLOP/s, e.g. 989.")
        return value * 1e12
    if device.type == "cuda":
        tflops = lookup_peak_tflops(torch.cuda.get_device_name(device), key)
        return None if tflops is None else tflops * 1e12
    if device.type == "cpu" and key in ("fp32", "bf16", "fp16"):
        return _measured_cpu_peak(key)
    return None


class ThroughputMeter:
    """Tokens/s, TFLOP/s per device and MFU between successive :meth:`read` calls.

    Pass the *global* count of real (non-padding) tokens of each optimizer step to :meth:`update`. MFU is per
    device (global FLOP/s over ``world_size`` peaks) and None when the peak is unknown or ``dtype`` is fp8: fp8
    training runs only some matmuls in fp8, so no single peak describes it.

    Example:
        >>> meter = ThroughputMeter(flops_per_token=6e9, device="cpu", dtype="fp32")
        >>> meter.update(4096)
        >>> sorted(meter.read())
        ['elapsed_s', 'mfu', 'tflops_per_device', 'tokens_per_s']
    """

    def __init__(self, flops_per_token: float, device: torch.device | str | int | None = None,
                 dtype: torch.dtype | str = "bf16", world_size: int | None = None) -> None:
        if not flops_per_token > 0:
            raise ConfigError(f"flops_per_token={flops_per_token!r} must be positive; see flops_per_token(config).")
        if world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            world_size = torch.distributed.get_world_size() if distributed else 1
        if world_size < 1:
            raise ConfigError(f"world_size={world_size} must be >= 1.")
        self.flops_per_token, self.world_size = float(flops_per_token), world_size
        self.device = _resolve_device(device)
        fp8 = _dtype_key(dtype, self.device) == "fp8"
        self.peak_flops = None if fp8 else peak_flops(self.device, dtype)
        self._tokens = 0
        self._start = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels are asynchronous: wait so time covers the work
        return time.perf_counter()

    def update(self, num_tokens: int) -> None:
        """Add the tokens of one optimizer step, summed over all ranks."""
        if num_tokens < 0:
            raise ConfigError(f"num_tokens={num_tokens} must be >= 0.")
        self._tokens += int(num_tokens)

    def read(self) -> dict[str, float | None]:
        """Rates since construction or the previous read, then start a new interval."""
        now = self._now()
        elapsed, tokens = now - self._start, self._tokens
        self._start, self._tokens = now, 0
        tokens_per_s = tokens / elapsed if elapsed > 0 else 0.0
        flops_per_device = tokens_per_s * self.flops_per_token / self.world_size
        mfu = flops_per_device / self.peak_flops if self.peak_flops else None
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_device / 1e12, "mfu": mfu,
                "elapsed_s": elapsed}


def memory_stats(device: torch.device | str | int | None = None) -> dict[str, float]:
    """Process RSS (current and peak) in GiB, plus CUDA peak allocated/reserved GiB on a GPU device.

    Example:
        >>> sorted(memory_stats("cpu"))
        ['cpu_peak_rss_gib', 'cpu_rss_gib']
    """
    import psutil

    device = _resolve_device(device)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    stats = {"cpu_peak_rss_gib": peak_rss / _GIB, "cpu_rss_gib": psutil.Process().memory_info().rss / _GIB}
    if device.type == "cuda":
        stats["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / _GIB
        stats["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / _GIB
    return stats


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return float(value) if value.numel() == 1 else [float(v) for v in value.flatten()]
    if type(value).__module__ == "numpy":  # numpy scalars and arrays, without importing numpy here
        return float(value) if value.size == 1 else [float(v) for v in value.flatten()]
    return value


class JsonlLogger:
    """Append one JSON object per line; a no-op when ``enabled`` is False (pass ``is_main_process``).

    Example:
        >>> log = JsonlLogger("outputs/run/metrics.jsonl", enabled=accelerator.is_main_process)
        >>> log.log({"step": 10, "loss": loss})  # tensors become floats
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def log(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line; the file is opened, flushed and closed each time so a crash loses nothing."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def rewind(self, step: int) -> None:
        """Drop records after ``step``: a fresh run (``step=0``) starts an empty log, a resumed run forgets the
        steps it is about to redo, so the log and the loss plot show each step once."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"No metrics log at {path}; train with logging enabled first (it writes metrics.jsonl).")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number} is not valid JSON ({exc.msg}); fix or delete that line.") from exc
    return records


def plot_loss_curve(jsonl_path: str | Path, png_path: str | Path, title: str | None = None) -> Path:
    """Plot train ``loss`` and ``eval_loss`` against ``step`` from a metrics JSONL into a PNG (written atomically).

    Example:
        >>> plot_loss_curve("outputs/run/metrics.jsonl", "outputs/run/loss.png", title="tiny llama")
        PosixPath('outputs/run/loss.png')
    """
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    jsonl_path, png_path = Path(jsonl_path), Path(png_path)
    records = _read_jsonl(jsonl_path)
    series = {}
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(r.get("step", i), r[key]) for i, r in enumerate(records) if isinstance(r.get(key), (int, float))]
        if points:
            series[label] = points
    if not series:
        raise ConfigError(f"{jsonl_path} has no records with 'loss' or 'eval_loss'; nothing to plot.")

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas renders without a display and leaves pyplot's global state alone
    ax = fig.add_subplot()
    for label, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=label, marker="o" if len(points) < 30 else None, markersize=3)
    values = [v for points in series.values() for _, v in points if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")  # 0.6 rather than 6×10⁻¹
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or jsonl_path.parent.name or "loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()

    png_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=f".{png_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, png_path)  # readers never see a half-written PNG
    except BaseException:
        os.unlink(tmp)
        raise
    return png_path

"""ONNX Runtime quantization of an export_onnx folder: dynamic INT8, static INT8 (QDQ, calibrated) and INT4 weight-only.

* ``dynamic-int8``: ``quantize_dynamic`` of MatMul/Gemm weights. Weights are QInt8: dynamic quantization makes the
  activations uint8, and U8S8 is the pair MLAS runs fastest on x86 (VPMADDUBSW on AVX2, VNNI's VPDPBUSD on
  AVX-512/AVX-VNNI). Without VNNI, U8S8 can saturate the 16-bit intermediate sums, so ``reduce_range`` (7-bit
  weights) is switched on automatically there, as ONNX Runtime's documentation advises.
* ``static-int8``: ``quantize_static`` in QDQ format (uint8 activations, int8 weights) calibrated on texts tokenized
  with the folder's tokenizer, with MinMax, Entropy or Percentile calibration; the KV-cache graph is fed empty past
  key/values so every calibration sample is a prefill.
* ``int4``: ``MatMulNBitsQuantizer`` weight-only, block-wise: ``rtn`` (round to nearest, default), ``hqq``, or
  ``gptq`` (needs Intel Neural Compressor, which ONNX Runtime imports for it).

The result is compared with the fp32 source export: max |logits diff|, top-1 agreement over positions and greedy
tokens, recorded with the settings in ``quantization.json``.

Example:
    >>> report = quantize_onnx("exported/", "exported-int8/", mode="dynamic-int8")
    >>> report["size_bytes"] < report["source_size_bytes"], report["parity"]["top1_agreement"]
    (True, 1.0)
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hf_optim.core.atomic import staged_directory
from hf_optim.core.evaluation import size_on_disk
from hf_optim.core.errors import ConfigError, HfOptimError
from hf_optim.export.onnx import EXTERNAL_DATA_FILE, _sample_batch
from hf_optim.export.ort_optimize import (
    OPTIMIZATION_FILE, QUANTIZATION_FILE, check_onnx_dir, copy_side_files, op_counts,
)
from hf_optim.export.runtime import ONNX_FILE, OnnxCausalLM

MODES = ("dynamic-int8", "static-int8", "int4")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")
INT4_ALGORITHMS = ("rtn", "hqq", "gptq")


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX-512 VNNI or AVX-VNNI); False when it cannot tell."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def default_reduce_range() -> bool:
    """7-bit weights only on x86 without VNNI, where U8S8 int8 products can saturate (ONNX Runtime's advice)."""
    return platform.machine().lower() in ("x86_64", "amd64") and not cpu_has_vnni()


class TextCalibrationReader:
    """A ``CalibrationDataReader`` feeding tokenized texts (one prefill each, empty KV cache) to the graph.

    The texts are tokenized, joined and cut into equal windows (about the average text length, at most
    ``max_length``): Entropy/Percentile calibration stacks the activations of all samples, so shapes must agree.

    Example:
        >>> reader = TextCalibrationReader(["Once upon a time"], tokenizer, session_inputs, max_length=64)
    """

    def __init__(self, texts: Sequence[str], tokenizer: Any, graph_inputs: Sequence[Any], max_length: int) -> None:
        encoded = [tokenizer(text)["input_ids"] for text in texts]
        stream = [token for ids in encoded for token in ids]
        window = min(max_length, len(stream) // max(len(encoded), 1))
        self._feeds = []
        for start in range(0, len(stream) - window + 1 if window else 0, window or 1):
            ids = np.asarray([stream[start : start + window]], dtype=np.int64)
            feed = {
                "input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(window, dtype=np.int64)[None],
            }
            for node in graph_inputs:
                if node.name.startswith("past_key_values."):
                    feed[node.name] = np.zeros((1, int(node.shape[1]), 0, int(node.shape[3])), dtype=np.float32)
            self._feeds.append(feed)
        if not self._feeds:
            raise ConfigError("calibration_texts gave no tokens; pass a few non-empty texts (e.g. 16-64 samples).")
        self._iter = iter(self._feeds)

    def get_next(self) -> dict | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def _parity(reference: OnnxCausalLM, candidate: OnnxCausalLM, new_tokens: int) -> dict:
    """How close the quantized graph stays to the fp32 export: logits diff, top-1 agreement, greedy prefix."""
    ids, mask = _sample_batch(reference.config.vocab_size, torch.Generator().manual_seed(0))
    ref = reference(input_ids=ids, attention_mask=mask).logits
    got = candidate(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    prompt = ids[:1, :6]
    expected = reference.generate(prompt, max_new_tokens=new_tokens)[0, 6:]
    produced = candidate.generate(prompt, max_new_tokens=new_tokens)[0, 6:]
    same = (expected == produced[: len(expected)]).int() if len(produced) >= len(expected) else None
    leading = int(same.cumprod(0).sum()) if same is not None else 0
    return {
        "max_abs_logits_diff": float((got - ref).abs()[real].max()),
        "mean_abs_logits_diff": float((got - ref).abs()[real].mean()),
        "logits_scale": float(ref[real].abs().max()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1))[real].float().mean()),
        "greedy_tokens": new_tokens,
        "greedy_identical_prefix": leading,
        "greedy_match": leading == new_tokens,
    }


def _graph_for_quantization(source: Path) -> Any:
    """The source graph, with shapes inferred when it was fused by optimize_onnx.

    The fused contrib ops (SkipLayerNormalization...) carry no shape information for ONNX's own inference, which is
    why ONNX Runtime 1.32 fails on such a graph with "Unable to find data type for .../MatMul_output_0"; ONNX
    Runtime's symbolic shape inference knows these ops.
    """
    import onnx

    model = onnx.load(str(source / ONNX_FILE), load_external_data=True)
    if (source / OPTIMIZATION_FILE).is_file():
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        try:
            model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception as exc:  # noqa: BLE001 - any failure here has the same remedy
            raise ConfigError(
                f"{str(source)!r} holds a graph fused by optimize_onnx whose shapes could not be inferred ({exc}); "
                "quantize the plain export_onnx folder instead (and optimize at O1 afterwards if needed)."
            ) from exc
    return model


def quantize_onnx(
    onnx_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    mode: str = "dynamic-int8",
    per_channel: bool = True,
    reduce_range: bool | None = None,
    calibration_texts: Sequence[str] | None = None,
    calibrate_method: str = "MinMax",
    tokenizer: Any = None,
    max_length: int = 128,
    algorithm: str = "rtn",
    block_size: int = 32,
    is_symmetric: bool = True,
    accuracy_level: int | None = None,
    new_tokens: int = 8,
) -> dict:
    """Quantize the graph of an ``export_onnx`` folder with ONNX Runtime into ``output_dir`` (written atomically).

    ``mode`` is ``dynamic-int8``, ``static-int8`` (needs ``calibration_texts``; ``calibrate_method`` MinMax, Entropy
    or Percentile; the folder's tokenizer unless ``tokenizer`` is given) or ``int4`` (``algorithm`` rtn/hqq/gptq,
    ``block_size``, ``accuracy_level`` 4 = int8 compute on the CPU). ``reduce_range`` None picks the CPU preset (see
    :func:`default_reduce_range`). quantization.json records the settings, sizes and parity with the fp32 source.

    Example:
        >>> report = quantize_onnx("exported/", "int4/", mode="int4", algorithm="rtn", block_size=32)
        >>> report["parity"]["max_abs_logits_diff"], report["size_bytes"]
        (0.05, 1203400)
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not a quantization mode; use one of {', '.join(MODES)}.")
    if mode == "static-int8":
        if calibrate_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibrate_method={calibrate_method!r} is not supported; use one of {', '.join(CALIBRATION_METHODS)}."
            )
    if (mode == "static-int8" or (mode == "int4" and algorithm == "gptq")) and not calibration_texts:
        raise ConfigError(f"mode={mode!r} needs calibration_texts (a few representative texts, e.g. 32).")
    if mode == "int4":
        if algorithm not in INT4_ALGORITHMS:
            raise ConfigError(f"algorithm={algorithm!r} is not an int4 algorithm; use one of {', '.join(INT4_ALGORITHMS)}.")
        if algorithm == "gptq":
            try:
                import neural_compressor  # noqa: F401 - ONNX Runtime's GPTQ path calls into it
            except ImportError as exc:
                raise ConfigError(
                    "algorithm='gptq' needs Intel Neural Compressor (pip install neural-compressor), which is not "
                    "installed; use algorithm='rtn' or 'hqq'."
                ) from exc
        if block_size < 16 or block_size & (block_size - 1):
            raise ConfigError(f"block_size={block_size} must be a power of two >= 16 (e.g. 32 or 128).")
    source = check_onnx_dir(onnx_dir)
    output_dir = Path(output_dir)
    if output_dir.resolve() == source.resolve():
        raise ConfigError(f"output_dir {str(output_dir)!r} is the source folder; write the quantized graph elsewhere.")
    if (source / QUANTIZATION_FILE).is_file():
        raise ConfigError(f"{str(source)!r} is already quantized; quantize the fp32 export_onnx folder instead.")
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    external = (source / EXTERNAL_DATA_FILE).exists()
    settings: dict[str, Any] = {"mode": mode, "source": str(source), "source_optimized": (source / OPTIMIZATION_FILE).is_file()}
    with staged_directory(output_dir) as staging:
        model = _graph_for_quantization(source)
        before = op_counts(model.graph)
        started = time.perf_counter()
        target = staging / ONNX_FILE
        if mode == "dynamic-int8":
            settings.update(per_channel=per_channel, reduce_range=reduce_range, weight_type="QInt8",
                            activation_type="QUInt8 (dynamic)", op_types=["MatMul", "Gemm"])
            quantize_dynamic(model, target, op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
                             reduce_range=reduce_range, weight_type=QuantType.QInt8, use_external_data_format=external)
        elif mode == "static-int8":
            reader = _calibration_reader(model, source, calibration_texts, tokenizer, max_length)
            settings.update(format="QDQ", per_channel=per_channel, reduce_range=reduce_range, weight_type="QInt8",
                            activation_type="QUInt8", calibrate_method=calibrate_method,
                            calibration_samples=len(reader._feeds), max_length=max_length, op_types=["MatMul", "Gemm"])
            quantize_static(
                model, target, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, calibrate_method),
                use_external_data_format=external,
            )
        else:
            settings.update(algorithm=algorithm, bits=4, block_size=block_size, is_symmetric=is_symmetric,
                            accuracy_level=accuracy_level)
            reader = None
            if algorithm == "gptq":
                reader = _calibration_reader(model, source, calibration_texts, tokenizer, max_length)
                settings["calibration_samples"] = len(reader._feeds)
            _quantize_int4(model, target, algorithm, block_size, is_symmetric, accuracy_level, external, reader)
        settings["quantize_seconds"] = round(time.perf_counter() - started, 3)
        copy_side_files(source, staging)
        import onnx

        settings["op_counts_before"] = before
        settings["op_counts_after"] = op_counts(onnx.load(str(target), load_external_data=False).graph)
        settings["source_size_bytes"] = size_on_disk(source)
        settings["size_bytes"] = size_on_disk(staging)
        reference = OnnxCausalLM.from_pretrained(source, providers=["CPUExecutionProvider"], num_threads=1)
        candidate = OnnxCausalLM.from_pretrained(staging, providers=["CPUExecutionProvider"], num_threads=1)
        settings["parity"] = _parity(reference, candidate, new_tokens)
        (staging / QUANTIZATION_FILE).write_text(json.dumps(settings, indent=2))
        del candidate  # the session holds the file open on some platforms; release it before the rename
    settings["output_dir"] = str(output_dir)
    return settings


def _calibration_reader(
    model: Any, source: Path, texts: Sequence[str], tokenizer: Any, max_length: int
) -> TextCalibrationReader:
    import onnxruntime as ort

    if tokenizer is None:
        tokenizer = _folder_tokenizer(source)
    inputs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).get_inputs()
    return TextCalibrationReader(texts, tokenizer, inputs, max_length)


def _folder_tokenizer(source: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{str(source)!r} has no tokenizer for the calibration texts; pass tokenizer=... to quantize_onnx."
        ) from exc


def _quantize_int4(
    model: Any, target: Path, algorithm: str, block_size: int, is_symmetric: bool, accuracy_level: int | None,
    external: bool, reader: TextCalibrationReader | None,
) -> None:
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    except ImportError as exc:  # ORT >= 1.22 imports onnx_ir there
        raise HfOptimError(f"int4 quantization needs onnx-ir ({exc}); install it: pip install onnx-ir") from exc
    if algorithm == "rtn":
        config = nbits.DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=is_symmetric, accuracy_level=accuracy_level
        )
    elif algorithm == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    else:
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=block_size)
    quantizer = nbits.MatMulNBitsQuantizer(
        model, block_size=block_size, is_symmetric=is_symmetric, accuracy_level=accuracy_level, algo_config=config
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)

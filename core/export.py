"""Deployable exports: verified fp32 ONNX, fp16 / int8 variants, uint8 graph, deploy bundle.

Everything goes through ``core.onnx_export.export_onnx`` (the one ONNX writer) and is timed
with ``core.latency.measure_latency`` (the one latency timer). Verification runs ONNX
Runtime over the whole test split against PyTorch; an fp32 export with a logit difference
above ``FP32_TOLERANCE`` or top-1 agreement below 100 % is marked failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import (
    CALIBRATION_NAME,
    MANIFEST_NAME,
    calibration_record,
    confidence_sentence,
    make_manifest,
    ood_sentence,
)
from core.evaluate import iter_batches
from core.hashing import sha256_file
from core.latency import Latency, MachineBusy, Spec, machine_id, measure_side_by_side, ort_session, provider_words
from core.onnx_export import OPSET, export_onnx, read_metadata
from core.preprocessing import Preprocessing

FP32_TOLERANCE = 1e-3  # max |logit difference| ORT vs PyTorch for an fp32 export to pass
TEMPLATE_DIR = Path(__file__).resolve().parent / "bundle_template"
ProgressCb = Callable[[str, float], None]


class ExportError(RuntimeError):
    """An export could not be produced or failed verification."""


# ------------------------------------------------------------------------------------------
# Loading a trained checkpoint
# ------------------------------------------------------------------------------------------
def load_trained(path: str | Path) -> Any:
    """The training engine's loader (``core.train.load_trained_model``): an object with model
    (eval, CPU), preprocessing, classes, variant, resolution, meta. Clear error if missing."""
    from core.train import load_trained_model

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint not found: {path}")
    return load_trained_model(path)


# ------------------------------------------------------------------------------------------
# fp32 export + verification
# ------------------------------------------------------------------------------------------
def onnx_metadata(classes: Sequence[str], pre: Preprocessing, variant: str, run_id: int | str | None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {
        "classes": list(classes),
        "input_size": [3, pre.resolution, pre.resolution],
        "input_layout": "NCHW float32, RGB",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "crop_pct": pre.crop_pct,
        "preprocessing": pre.to_dict(),
        "variant": variant,
        "run_id": "" if run_id is None else str(run_id),
        "producer": "workbench",
    }
    md.update(extra or {})
    return md


def export_fp32(model: Any, path: str | Path, pre: Preprocessing, classes: Sequence[str], variant: str,
                run_id: int | str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Eval-mode fp32 ONNX (opset 17, dynamic batch) with labels/preprocessing metadata in the file."""
    return export_onnx(model, path, pre.resolution, metadata=onnx_metadata(classes, pre, variant, run_id, extra))


@dataclass
class Verification:
    n_images: int
    max_abs_logit_diff: float
    top1_agreement: float
    tolerance: float
    passed: bool
    reason: str = ""
    torch_logits: np.ndarray | None = None
    ort_logits: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("torch_logits")
        d.pop("ort_logits")
        return d


def verify_onnx(model: Any, onnx_path: str | Path, paths: Sequence[Path], pre: Preprocessing, *,
                tolerance: float = FP32_TOLERANCE, min_agreement: float = 1.0, batch_size: int = 32,
                progress: ProgressCb | None = None) -> Verification:
    """Run PyTorch and ONNX Runtime on every image in ``paths`` (the whole test split)."""
    import torch

    if not paths:
        raise ExportError("verification needs test images, and the test split is empty")
    sess = ort_session(onnx_path)
    name = sess.get_inputs()[0].name
    model.eval()
    tl, ol = [], []
    with torch.inference_mode():
        for x in iter_batches(paths, pre, batch_size):
            tl.append(model(torch.from_numpy(x)).float().numpy())
            ol.append(sess.run(None, {name: x})[0].astype(np.float32))
            if progress:
                done = sum(len(a) for a in tl)
                progress(f"verified {done}/{len(paths)} images", done / len(paths))
    t, o = np.concatenate(tl), np.concatenate(ol)
    return judge_verification(t, o, tolerance, min_agreement)


def judge_verification(torch_logits: np.ndarray, ort_logits: np.ndarray, tolerance: float = FP32_TOLERANCE,
                       min_agreement: float = 1.0) -> Verification:
    """Pass/fail of an export from both sets of logits (same images, same order)."""
    t, o = np.asarray(torch_logits, np.float32), np.asarray(ort_logits, np.float32)
    diff = float(np.abs(t - o).max())
    agree = float((t.argmax(1) == o.argmax(1)).mean())
    reasons = []
    if not diff <= tolerance:  # also catches NaN
        reasons.append(f"max |logit difference| {diff:.2e} exceeds {tolerance:.0e}")
    if agree < min_agreement:
        reasons.append(f"top-1 agreement {agree:.2%} is below {min_agreement:.0%}")
    return Verification(len(t), diff, agree, tolerance, not reasons, "; ".join(reasons), t, o)


def ort_logits(onnx_path: str | Path, paths: Sequence[Path], pre: Preprocessing, batch_size: int = 32) -> np.ndarray:
    sess = ort_session(onnx_path)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x})[0].astype(np.float32) for x in iter_batches(paths, pre, batch_size)]
    return np.concatenate(outs)


# ------------------------------------------------------------------------------------------
# Optimised variants
# ------------------------------------------------------------------------------------------
def _copy_metadata(src: Any, dst: Any, extra: dict[str, str]) -> None:
    existing = {p.key for p in dst.metadata_props}
    for p in src.metadata_props:
        if p.key not in existing:
            dst.metadata_props.add(key=p.key, value=p.value)
    for k, v in extra.items():
        dst.metadata_props.add(key=k, value=v)


def _save_atomic(proto: Any, path: Path) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights AND fp16 compute, fp32 input/output (so callers feed the same tensors).

    Uses onnxruntime's bundled copy of onnxconverter-common's float16 converter
    (onnxconverter-common itself is not installed). ORT CPU has fp16 kernels for these ops
    but most x86 CPUs lack native fp16 arithmetic: expect half the size, not more speed.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(src))
    m16 = convert_float_to_float16(m, keep_io_types=True)
    _copy_metadata(m, m16, {"precision": "fp16"})
    # No onnx.checker here: the converter appends input Casts out of topological order, which
    # the checker rejects but ONNX Runtime accepts (tests load and run the file in ORT).
    return _save_atomic(m16, Path(dst))


class _CalibReader:
    """Feeds preprocessed training images to the int8 calibrator, one batch at a time."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessing, input_name: str, batch_size: int = 8):
        self._it = iter_batches(list(paths), pre, batch_size)
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self._name: x}


def quantize_int8(src: str | Path, dst: str | Path, calib_paths: Sequence[Path], pre: Preprocessing) -> Path:
    """Static int8 quantisation: QDQ format, per-channel weights, activations calibrated
    (MinMax) on ``calib_paths`` (images from the TRAINING split, never the test split)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calib_paths:
        raise ExportError("int8 calibration needs training images, and none were given")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    prep = dst.with_suffix(".prep.onnx")
    tmp = dst.with_suffix(dst.suffix + ".part")
    try:
        # Shape inference + graph cleanup first, as ORT recommends for static quantisation.
        quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
        name = onnx.load(str(prep), load_external_data=False).graph.input[0].name
        quantize_static(str(prep), str(tmp), _CalibReader(calib_paths, pre, name), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        q = onnx.load(str(tmp))
        _copy_metadata(onnx.load(str(src), load_external_data=False), q,
                       {"precision": "int8", "calibration_images": str(len(calib_paths))})
        _save_atomic(q, dst)
    finally:
        prep.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return dst


# ------------------------------------------------------------------------------------------
# uint8 NHWC graph: resize + crop + normalise inside the model
# ------------------------------------------------------------------------------------------
UINT8_RESIZE_NOTE = (
    "The uint8 graph resizes with ONNX Resize (opset 17: same mode and a=-0.5 cubic kernel as PIL, "
    "half-pixel centres, rounded to uint8), but WITHOUT antialiasing: PIL widens its filter when "
    "shrinking an image, ONNX Resize at opset 17 cannot. Pixels differ when downscaling by a large "
    "factor, so logits differ slightly from the PIL path; the measured agreement is recorded."
)


def build_uint8_graph(fp32_path: str | Path, dst: str | Path, pre: Preprocessing) -> Path:
    """Prepend resize-shorter-side, centre crop and normalisation to the fp32 model.

    Input 'image_uint8' (N, H, W, 3) uint8 RGB, any H and W (one size per batch). Output 'logits'.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    base = onnx.load(str(fp32_path))
    R = pre.resolution
    mode = {"bicubic": "cubic", "bilinear": "linear", "nearest": "nearest"}[pre.interpolation]

    def const(name: str, arr: np.ndarray) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))

    nodes = [
        const("pre_hw_idx", np.array([2, 3], np.int64)),
        const("pre_nc_idx", np.array([0, 1], np.int64)),
        const("pre_resize_to", np.array([float(pre.resize_to)], np.float32)),
        const("pre_res_f", np.array([float(R)], np.float32)),
        const("pre_res_i", np.array([R, R], np.int64)),
        const("pre_two", np.array([2], np.int64)),
        const("pre_axes", np.array([2, 3], np.int64)),
        const("pre_zero", np.array(0.0, np.float32)),
        const("pre_255", np.array(255.0, np.float32)),
        const("pre_mean", (np.asarray(pre.mean, np.float32) * 255.0).reshape(1, 3, 1, 1)),
        const("pre_std", (np.asarray(pre.std, np.float32) * 255.0).reshape(1, 3, 1, 1)),
        helper.make_node("Cast", ["image_uint8"], ["pre_f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pre_f"], ["pre_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Shape", ["pre_nchw"], ["pre_shape"]),
        helper.make_node("Gather", ["pre_shape", "pre_hw_idx"], ["pre_hw"]),
        helper.make_node("Gather", ["pre_shape", "pre_nc_idx"], ["pre_nc"]),
        helper.make_node("Cast", ["pre_hw"], ["pre_hw_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMin", ["pre_hw_f"], ["pre_short"], keepdims=1),
        helper.make_node("Div", ["pre_resize_to", "pre_short"], ["pre_scale"]),
        helper.make_node("Mul", ["pre_hw_f", "pre_scale"], ["pre_new_f0"]),
        helper.make_node("Round", ["pre_new_f0"], ["pre_new_f1"]),  # half-to-even, like Python's round()
        helper.make_node("Max", ["pre_new_f1", "pre_res_f"], ["pre_new_f"]),
        helper.make_node("Cast", ["pre_new_f"], ["pre_new_hw"], to=TensorProto.INT64),
        helper.make_node("Concat", ["pre_nc", "pre_new_hw"], ["pre_sizes"], axis=0),
        helper.make_node("Resize", ["pre_nchw", "", "", "pre_sizes"], ["pre_resized0"], mode=mode,
                         coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.5, exclude_outside=1,
                         nearest_mode="floor"),
        # PIL returns uint8: round and clip so the crop sees the same integer pixels.
        helper.make_node("Round", ["pre_resized0"], ["pre_resized1"]),
        helper.make_node("Clip", ["pre_resized1", "pre_zero", "pre_255"], ["pre_resized"]),
        helper.make_node("Sub", ["pre_new_hw", "pre_res_i"], ["pre_extra"]),
        helper.make_node("Div", ["pre_extra", "pre_two"], ["pre_start"]),  # floor for >= 0, as PIL's // 2
        helper.make_node("Add", ["pre_start", "pre_res_i"], ["pre_end"]),
        helper.make_node("Slice", ["pre_resized", "pre_start", "pre_end", "pre_axes"], ["pre_crop"]),
        helper.make_node("Sub", ["pre_crop", "pre_mean"], ["pre_centered"]),
        helper.make_node("Div", ["pre_centered", "pre_std"], ["pre_out"]),
    ]
    inp = helper.make_tensor_value_info("image_uint8", TensorProto.UINT8, ["batch", "height", "width", 3])
    out = helper.make_tensor_value_info("pre_out", TensorProto.FLOAT, ["batch", 3, R, R])
    pre_model = helper.make_model(helper.make_graph(nodes, "preprocess", [inp], [out]),
                                  opset_imports=[helper.make_opsetid("", OPSET)])
    pre_model.ir_version = base.ir_version
    merged = onnx.compose.merge_models(pre_model, base, io_map=[("pre_out", base.graph.input[0].name)])
    del merged.metadata_props[:]
    _copy_metadata(base, merged, {"input_format": "uint8 NHWC RGB, any size; resize/crop/normalise inside",
                                  "resize_note": UINT8_RESIZE_NOTE})
    onnx.checker.check_model(merged)
    return _save_atomic(merged, Path(dst))


def uint8_agreement(uint8_path: str | Path, fp32_path: str | Path, paths: Sequence[Path],
                    pre: Preprocessing) -> dict[str, Any]:
    """Compare the uint8 graph (raw decoded pixels in) with the fp32 graph on PIL-preprocessed input."""
    from core.images import load_rgb

    s8 = ort_session(uint8_path)
    ref = ort_logits(fp32_path, paths, pre)
    got = np.concatenate([s8.run(None, {"image_uint8": np.asarray(load_rgb(p), np.uint8)[None]})[0] for p in paths])
    return {"n_images": len(paths), "max_abs_logit_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "note": UINT8_RESIZE_NOTE}


# ------------------------------------------------------------------------------------------
# Measuring a variant
# ------------------------------------------------------------------------------------------
def _speed_record(path: Path, b1: Latency | None, bt: Latency | None, throughput_batch: int,
                  note: str = "") -> dict[str, Any]:
    size = path.stat().st_size
    provider = str(b1.conditions.get("provider", "")) if b1 else ""
    warning = "; ".join(w for w in (note, f"batch 1: {b1.warning}" if b1 and b1.warning else "",
                                    f"batch {throughput_batch}: {bt.warning}" if bt and bt.warning else "") if w)
    return {"onnx_mb": size / 1e6, "bytes": size,
            "latency_ms_p50": b1.p50_ms if b1 else None, "latency_ms_p95": b1.p95_ms if b1 else None,
            "throughput_batch": throughput_batch, "throughput_images_per_s": bt.images_per_s if bt else None,
            "machine": machine_id(), "latency_b1": b1.to_dict() if b1 else None,
            "latency_bt": bt.to_dict() if bt else None,
            "latency_conditions": dict(b1.conditions) if b1 else {}, "latency_note": warning,
            # Beside the figure: what ONNX Runtime ran on, raw and in words ("" when nothing was timed).
            "latency_provider": provider, "latency_on": provider_words(provider)}


def measure_variants(paths: Mapping[str, str | Path], resolution: int, *, runs: int = 20, max_seconds: float = 10.0,
                     throughput_batch: int = 32, throughput_runs: int = 5, idle_wait_s: float = 60.0,
                     say: Callable[[str], None] | None = None, device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Size, p50/p95 at batch 1 and images/s at ``throughput_batch`` of several models (e.g. the
    precisions of one export), all timed in one sitting, round-robin, so they compare side by side,
    with ONNX Runtime on ``device`` (``core.latency.ort_providers``; the provider is recorded).

    On a busy machine nothing is timed: every record says "not measured: machine busy ..." in
    ``latency_note`` and carries None for the speeds (a figure taken under load is never kept)."""
    named = {k: Path(v) for k, v in paths.items()}
    try:
        b1 = measure_side_by_side([Spec(k, v, resolution, 1) for k, v in named.items()], runs=runs,
                                  max_seconds=max_seconds, idle_wait_s=idle_wait_s, say=say, device=device)
        bt = measure_side_by_side([Spec(k, v, resolution, throughput_batch) for k, v in named.items()], warmup=1,
                                  rounds=min(5, throughput_runs), runs=throughput_runs, max_seconds=max_seconds,
                                  idle_wait_s=idle_wait_s, say=say, device=device)
    except MachineBusy as e:
        note = f"not measured: machine busy (load {e.load:.1f} on {os.cpu_count()} cores) — measure again later"
        return {k: _speed_record(v, None, None, throughput_batch, note) for k, v in named.items()}
    return {k: _speed_record(v, b1[k], bt[k], throughput_batch) for k, v in named.items()}


def measure_variant(onnx_path: str | Path, resolution: int, *, runs: int = 20, max_seconds: float = 10.0,
                    throughput_batch: int = 32, throughput_runs: int = 5, idle_wait_s: float = 60.0) -> dict[str, Any]:
    """One model's record (see ``measure_variants``)."""
    return measure_variants({"model": onnx_path}, resolution, runs=runs, max_seconds=max_seconds,
                            throughput_batch=throughput_batch, throughput_runs=throughput_runs,
                            idle_wait_s=idle_wait_s)["model"]


# ------------------------------------------------------------------------------------------
# Deploy bundle
# ------------------------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "onnx", "onnxruntime", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2%}" if pct else f"{v:.4g}"
    return str(v)


def _fmt3(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def bundle_calibration(info: dict[str, Any]) -> dict[str, Any]:
    """What goes into calibration.json: ``info["calibration"]`` if the caller made it, else
    derived from the evaluation's metrics (``core.bundle.calibration_record``)."""
    given = info.get("calibration")
    return given if isinstance(given, dict) else calibration_record(info.get("metrics"), list(info["classes"]))


def _range(interval: dict[str, Any] | None) -> str:
    """A 95 % range as "89.1–97.3 %" (blank when there is none)."""
    return "" if not interval else f"{interval['lo']:.1%}–{interval['hi']:.1%}".replace("%–", "–")


def _ms(v: float | None) -> str:
    return "not measured" if v is None else f"{v:.1f}"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def calibration_section(cal: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """The model card's calibration and decision paragraphs, in plain words."""
    L = ["## Confidence and decisions", f"- {confidence_sentence(cal)}"]
    if cal.get("calibrated"):
        L.append(f"- How: a temperature of {cal['temperature']:.3f}, fitted on {cal.get('n_val') or 'the'} "
                 f"validation images, softens or sharpens the scores. `predict.py` and Workbench apply it for you "
                 f"(it is in `{CALIBRATION_NAME}`); the ONNX files output the raw scores.")
    else:
        L.append(f"- `{CALIBRATION_NAME}` holds temperature 1.0: the scores are used as they are.")
    warning = (metrics.get("calibration") or {}).get("warning")
    if warning:
        L.append(f"- Warning: {warning}")
    dec = cal.get("decision")
    if dec:
        val, tst = dec.get("val"), dec.get("test") or {}
        target = dec.get("target_sensitivity")
        L.append(f"- Decision: `predict.py` answers `{dec['positive_class']}` when the probability of "
                 f"`{dec['positive_class']}` is at least {dec['threshold']:.4f}, otherwise "
                 f"`{dec['negative_class']}` (CSV column `decision`).")
        chosen = (f"The threshold was chosen on the {dec['chosen_on']}"
                  + (f" to find {target:.0%} of the `{dec['positive_class']}` images" if target else ""))
        if val:
            chosen += (f": sensitivity {_pct(val['sensitivity'])}, specificity {_pct(val['specificity'])} there; "
                       f"on the test split {_pct(tst.get('sensitivity'))} and {_pct(tst.get('specificity'))}.")
        else:
            chosen += (f": test sensitivity {_pct(tst.get('sensitivity'))}, specificity "
                       f"{_pct(tst.get('specificity'))}.")
        L.append(f"- {chosen} Confirm it on new data before relying on it.")
    elif cal.get("decision_note"):
        L.append(f"- No decision threshold: {cal['decision_note']}. The predicted label is the most likely class.")
    if (ood := ood_sentence(cal)) is not None:
        L.append(f"- {ood}")
    return L


# Test metric -> (Hugging Face metric type, display name): the model-index of the front matter.
_HUB_METRICS = {"accuracy": ("accuracy", "Test accuracy"),
                "balanced_accuracy": ("balanced_accuracy", "Test balanced accuracy"),
                "macro_f1": ("f1", "Test macro F1"),
                "macro_roc_auc": ("roc_auc", "Test macro ROC-AUC (one-vs-rest)")}


def _family_words(variant: str) -> tuple[str, str]:
    """(tag, title) of a variant's model family; ("", "Model") for a name no family claims."""
    from core.registry import UnknownVariantError, family_of

    try:
        family = family_of(str(variant))
    except UnknownVariantError:
        return "", "Model"
    return family.name, family.title


def card_front_matter(info: dict[str, Any]) -> list[str]:
    """Hugging Face model-card metadata (YAML between --- lines), so the card can go to a hub as it is."""
    import yaml

    from core.weights import timm_checkpoints

    ds = info.get("dataset") or {}
    m = info.get("metrics") or {}
    variant = str(info["variant"]).split("@")[0]
    family = _family_words(variant)[0]
    dataset_name = str(ds.get("name") or "unnamed dataset")
    meta: dict[str, Any] = {
        "library_name": "onnx",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "onnx", *([family, f"{family}-{variant}"] if family else []), "workbench"],
        "datasets": [dataset_name],
        "metrics": [hub for key, (hub, _) in _HUB_METRICS.items() if m.get(key) is not None],
    }
    checkpoint = timm_checkpoints().get(variant)
    if checkpoint is not None:
        meta["base_model"] = f"timm/{checkpoint}"
    results = [{"type": hub, "name": name, "value": float(m[key]), **({"args": {"average": "macro"}}
                                                                        if key.startswith("macro") else {})}
               for key, (hub, name) in _HUB_METRICS.items() if m.get(key) is not None]
    if results:
        title = info.get("title") or f"workbench-{variant}" + (f"-run{info['run_id']}" if info.get("run_id") else "")
        meta["model-index"] = [{"name": str(title), "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": dataset_name, "type": dataset_name, "split": "test"},
            "metrics": results}]}]
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", ""]


def model_card(info: dict[str, Any], file_hashes: dict[str, str]) -> str:
    """README.md for the bundle. ``info`` keys (all optional except classes/pre/variant):
    run_id, dataset {name, num_images, split_counts, health_warnings}, config, seed, metrics,
    calibration, operating_point, variants {name: measurements}, verification."""
    pre: Preprocessing = info["preprocessing"]
    ds = info.get("dataset") or {}
    m = info.get("metrics") or {}
    L: list[str] = [*card_front_matter(info), f"# Model card: {info.get('title') or 'Workbench image classifier'}", ""]
    L += [f"Generated by Workbench on {datetime.now(UTC):%Y-%m-%d %H:%M UTC}"
          + (f" from run {info['run_id']}." if info.get("run_id") is not None else "."), ""]
    L += ["## Model",
          f"- Architecture: {_family_words(info['variant'])[1]} **{info['variant']}**, "
          f"input {pre.resolution}x{pre.resolution} RGB",
          f"- Classes ({len(info['classes'])}): " + ", ".join(f"`{c}`" for c in info["classes"]),
          f"- Preprocessing: shorter side to {pre.resize_to} px ({pre.interpolation}), centre crop "
          f"{pre.resolution} px, x/255, mean {list(pre.mean)}, std {list(pre.std)} (see `preprocessing.json`)", ""]
    L += ["## Training data", f"- Dataset: {ds.get('name', 'n/a')} ({ds.get('num_images', 'n/a')} images)"]
    for split, counts in (ds.get("split_counts") or {}).items():
        L.append(f"- {split}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    warnings = ds.get("health_warnings") or []
    L.append("- Health warnings: " + ("none recorded" if not warnings else ""))
    L += [f"  - {w}" for w in warnings]
    cfg = info.get("config") or {}
    L += ["", "## Training configuration", f"- Seed: {info.get('seed', cfg.get('seed', 'n/a'))}",
          "```json", json.dumps(cfg, indent=1, default=str)[:4000], "```", ""]
    if m:
        iv = m.get("intervals") or {}
        recall_iv = iv.get("per_class_recall") or []
        L += ["## Test metrics (held-out test split, never used for model selection)", "",
              "| metric | value | 95 % range |", "|---|---|---|",
              f"| images | {m.get('n', 'n/a')} | |",
              f"| accuracy | {_fmt(m.get('accuracy'), True)} | {_range(iv.get('accuracy'))} |",
              f"| balanced accuracy | {_fmt(m.get('balanced_accuracy'), True)} | |",
              f"| macro F1 | {_fmt(m.get('macro_f1'))} | {_range(iv.get('macro_f1'))} |",
              f"| macro ROC-AUC (one-vs-rest) | {_fmt(m.get('macro_roc_auc'))} | |", ""]
        if iv:
            L += [f"The 95 % ranges say how far each figure could move on another {iv['n']} images like these "
                  f"(accuracy and recall: {iv['accuracy']['method']} interval; macro F1: "
                  f"{iv['macro_f1']['method']}).", ""]
        L += ["| class | precision | recall | recall 95 % range | F1 | support |", "|---|---|---|---|---|---|"]
        # None: undefined for a class absent from the test split (not counted in the macro average).
        L += [f"| {c['class']} | {_fmt3(c['precision'])} | {_fmt3(c['recall'])} | "
              f"{_range(recall_iv[i] if i < len(recall_iv) else None)} | {_fmt3(c['f1'])} | {c['support']} |"
              for i, c in enumerate(m.get("per_class", []))]
        L.append("")
    L += [*calibration_section(bundle_calibration(info), m), ""]
    ver = info.get("verification")
    if ver:
        L += ["## Export verification (ONNX Runtime vs PyTorch, whole test split)",
              f"- {ver['n_images']} images, max |logit difference| {ver['max_abs_logit_diff']:.2e} "
              f"(tolerance {ver['tolerance']:.0e}), top-1 agreement {ver['top1_agreement']:.2%}: "
              f"**{'passed' if ver['passed'] else 'FAILED'}**", ""]
    variants = info.get("variants") or {}
    if variants:
        first = next(iter(variants.values()))
        machine = str(first.get("machine", "?"))
        cond = first.get("latency_conditions") or {}
        ran_on = provider_words(str(cond.get("provider") or "CPUExecutionProvider"))
        L += [f"## Files and speed (ONNX Runtime on {ran_on}, measured on {machine})", "",
              "| file | precision | MB | p50 ms (batch 1) | p95 ms | images/s (batch 32) | test accuracy | vs fp32 |",
              "|---|---|---|---|---|---|---|---|"]
        for name, v in variants.items():
            delta = v.get("accuracy_delta")
            L.append(f"| `{v.get('file', name)}` | {name} | {v['onnx_mb']:.2f} | {_ms(v.get('latency_ms_p50'))} | "
                     f"{_ms(v.get('latency_ms_p95'))} | {_ms(v.get('throughput_images_per_s'))} | "
                     f"{_fmt(v.get('accuracy'), True)} | "
                     f"{'' if delta is None else f'{delta:+.2%}'} |")
        L.append("")
        if cond:
            when = str(cond.get("measured_at", "?")).replace("T", " ").replace("+00:00", "")
            L += [f"All speeds above were measured side by side in one sitting on {when} "
                  f"UTC with the other processes idle (load {cond.get('load_before', '?')} before, "
                  f"{cond.get('load_after', '?')} after), {cond.get('threads', '?')} threads, "
                  f"{cond.get('provider', '?')}, onnxruntime {cond.get('onnxruntime', '?')}.", ""]
        L += [f"- Note ({name}): {v['latency_note']}" for name, v in variants.items() if v.get("latency_note")]
        L.append("")
    L += ["## Intended use and limits",
          "- Decision support on images like the training data (same kind of camera, crop, population). "
          "Not validated for other sources; performance on new data may be lower than the test figures.",
          "- Confidence is not a guarantee; low-confidence images should be reviewed by an expert.",
          "- The model only knows the classes above: anything else is forced into one of them.",
          "- The test split is small if the dataset is small: treat the metrics as estimates with uncertainty.", "",
          "## Usage", "```", "pip install onnxruntime numpy pillow  # plus pydicom for DICOM (.dcm) files",
          "python predict.py path/to/images_or_folder --csv predictions.csv --top-k 3", "```",
          "The CSV has one row per image: path, predicted_label, confidence, top_k"
          + (", decision" if (bundle_calibration(info).get("decision")) else "")
          + ". The confidences already include the temperature above: use them as they are.", "",
          "## Library versions", *[f"- {k}: {v}" for k, v in library_versions().items()], "",
          "## File checksums (sha256)", *[f"- `{n}`: `{h}`" for n, h in sorted(file_hashes.items())], ""]
    return "\n".join(L)


def build_bundle(zip_path: str | Path, models: dict[str, Path], info: dict[str, Any], *,
                 key: bytes | None = None) -> Path:
    """Write the deploy zip: the ONNX files (``{"model.onnx": path, "model_int8.onnx": path}``),
    labels.json, preprocessing.json, calibration.json (temperature and two-class threshold, see
    ``bundle_calibration``), predict.py, README.md (the model card, with the sha256 of
    every other file for people) and manifest.json (the sha256 of every file, for machines:
    ``core.bundle.open_bundle`` and predict.py check it). With ``key`` the manifest carries an
    HMAC-SHA256 signature; the caller reads the key from its settings."""
    pre: Preprocessing = info["preprocessing"]
    if "model.onnx" not in models:
        raise ExportError("a bundle needs the verified fp32 model as 'model.onnx'")
    texts = {
        "labels.json": json.dumps(list(info["classes"]), indent=1),
        "preprocessing.json": pre.to_json(),
        CALIBRATION_NAME: json.dumps(bundle_calibration(info), indent=1) + "\n",
        "predict.py": (TEMPLATE_DIR / "predict.py").read_text(),
    }
    hashes = {n: sha256_file(p) for n, p in models.items()}
    hashes.update({n: hashlib.sha256(t.encode()).hexdigest() for n, t in texts.items()})
    texts["README.md"] = model_card(info, hashes)
    hashes["README.md"] = hashlib.sha256(texts["README.md"].encode()).hexdigest()
    manifest = make_manifest(hashes, run_id=info.get("run_id"), key=key)
    texts[MANIFEST_NAME] = json.dumps(manifest, indent=1) + "\n"
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_suffix(zip_path.suffix + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, p in models.items():
            zf.write(p, name)
        for name, t in texts.items():
            zf.writestr(name, t)
    tmp.replace(zip_path)
    return zip_path


__all__ = [
    "FP32_TOLERANCE", "ExportError", "Verification", "judge_verification", "load_trained",
    "onnx_metadata", "export_fp32", "verify_onnx", "ort_logits", "convert_fp16", "quantize_int8",
    "build_uint8_graph", "uint8_agreement", "UINT8_RESIZE_NOTE", "measure_variant", "measure_variants", "model_card",
    "card_front_matter",
    "build_bundle", "bundle_calibration", "calibration_section", "library_versions", "read_metadata",
]

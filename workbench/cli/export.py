"""``workbench evaluate | export | predict``: evaluation and deployable exports from the shell."""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from core.bundle import BundleError, BundlePredictor, Prediction, Signature, open_bundle
from core.names import is_id
from workbench.cli.exits import EXIT_FAILED, fail, id_arg
from workbench.cli.output import add_json_flag, print_json

DEFAULT_CSV = "predictions.csv"


def _progress(msg: str, frac: float) -> None:
    print(f"[{frac:5.0%}] {msg}", file=sys.stderr)


def _score(value: float | None) -> str:
    """A per-class score; '  -  ' where it is undefined (a class absent from the split)."""
    return "  -  " if value is None else f"{value:.3f}"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core.train.robustness import DeviceError, resolve_device
    from workbench.compute import chosen_device
    from workbench.evaluations import EvaluationError, UnknownRunError, evaluate_run

    try:
        device = chosen_device(args.device)
        resolve_device(device)  # before any loading
        out = evaluate_run(args.run, tta=args.tta, sensitivity=args.sensitivity, positive_class=args.positive_class,
                           progress=_progress, device=device)
    except (DeviceError, UnknownRunError) as e:
        return fail(str(e))
    except (EvaluationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print_json(out)
        return 0
    m = out.metrics
    print(f"run {args.run}: test split, {m['n']} images{' (flip TTA)' if m['tta'] else ''}")
    print(f"  accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}"
          f"  macro-F1 {m['macro_f1']:.4f}"
          + (f"  macro ROC-AUC {m['macro_roc_auc']:.4f}" if m["macro_roc_auc"] is not None else ""))
    iv = m.get("intervals") or {}
    if iv:
        print(f"  95 % ranges on these {iv['n']} images: accuracy {_range(iv['accuracy'])}, "
              f"macro-F1 {_range(iv['macro_f1'])}")
    recall_iv = iv.get("per_class_recall") or []
    for i, c in enumerate(m["per_class"]):
        scores = "  ".join(f"{k} {_score(c[key])}" for k, key in (("P", "precision"), ("R", "recall"), ("F1", "f1")))
        r_iv = recall_iv[i] if i < len(recall_iv) else None
        print(f"  {c['class']:<24} {scores}" + (f" (95 % range {_range(r_iv)})" if r_iv else "") + f"  n={c['support']}"
              + ("" if c.get("counted", True) else "  (absent from the test split: not in the averages)"))
    cal = m["calibration"]
    line = f"  ECE {cal['before']['ece']:.4f}"
    if cal.get("temperature"):
        line += f" -> {cal['after']['ece']:.4f} after temperature {cal['temperature']:.3f} (fitted on val)"
    print(line)
    if cal.get("warning"):
        print(f"  warning: {cal['warning']}")
    if "tta_effect" in m:
        effect = m["tta_effect"]
        print(f"  TTA: accuracy {effect['without']['accuracy']:.4f} -> {effect['with']['accuracy']:.4f} "
              f"({effect['accuracy_delta']:+.4f}), {effect['changed_predictions']} predictions changed")
    op = m.get("operating_point")
    if op and "threshold" in op:
        print(f"  '{op['positive_class']}' threshold {op['threshold']:.4f} (chosen on {op['chosen_on']} for "
              f"{op['target_sensitivity']:.0%} sensitivity): test sensitivity {op['sensitivity']:.3f}, "
              f"specificity {op['specificity']:.3f}")
    elif op:
        print(f"  operating point: {op['error']}")
    print(f"  evaluation #{out.evaluation_id}, {len(out.plots)} plots/reports saved")
    return 0


def _range(interval: dict[str, float]) -> str:
    return f"{interval['lo'] * 100:.1f}-{interval['hi'] * 100:.1f} %"


def _speed(v: float | None, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.1f}"


def cmd_export(args: argparse.Namespace) -> int:
    from core.train.robustness import DeviceError
    from storage.artifacts import ArtifactError
    from workbench.compute import latency_provider, measured_on
    from workbench.evaluations import EvaluationError, UnknownRunError
    from workbench.exports import export_run

    try:
        out = export_run(args.run, fp16=args.fp16, int8=args.int8, uint8_graph=args.uint8, out_path=args.output,
                         progress=_progress)
    except (DeviceError, UnknownRunError) as e:  # WORKBENCH_DEVICE names a GPU this machine lacks, or no such run
        return fail(str(e))
    except (EvaluationError, ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print_json(out)
        return 0
    v = out.verification or {}
    print(f"fp32 verified on {v['n_images']} test images: max |logit diff| {v['max_abs_logit_diff']:.2e}, "
          f"top-1 agreement {v['top1_agreement']:.2%}")
    print(f"{'precision':<10}{'MB':>8}{'p50 ms':>9}{'p95 ms':>9}{'img/s@32':>10}{'accuracy':>10}{'vs fp32':>9}")
    for name, m in out.variants.items():
        print(f"{name:<10}{m['onnx_mb']:>8.2f}{_speed(m['latency_ms_p50'], 9)}{_speed(m['latency_ms_p95'], 9)}"
              f"{_speed(m['throughput_images_per_s'], 10)}{m['accuracy']:>10.4f}{m['accuracy_delta']:>+9.4f}")
    first = next(iter(out.variants.values()))
    cond = first.get("latency_conditions") or {}
    if cond:
        print(f"speeds measured{measured_on(out.variants.values())} (ONNX Runtime {latency_provider(first)}) side by "
              f"side on {cond.get('measured_at')} UTC, load {cond.get('load_before')} before / "
              f"{cond.get('load_after')} after, {cond.get('threads')} threads, onnxruntime {cond.get('onnxruntime')}")
    for note in dict.fromkeys(m.get("latency_note") for m in out.variants.values()):
        if note:
            print(f"note: {note}")
    if out.uint8_graph:
        u = out.uint8_graph
        print(f"uint8 graph vs PIL path: top-1 agreement {u['top1_agreement']:.2%}, max |logit diff| "
              f"{u['max_abs_logit_diff']:.3g}")
    print(f"bundle: {out.out_path or out.bundle_path}")
    return 0


def _write_predictions(rows: list[Prediction], csv_path: Path, decides: bool, checks_ood: bool = False) -> None:
    """The bundle's predict.py columns; ``decision`` only for a two-class model with a threshold,
    ``ood_score`` / ``outside_training_data`` only when the model has the out-of-distribution check."""
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted_label", "confidence", "top_k"] + (["decision"] if decides else [])
                   + (["ood_score", "outside_training_data"] if checks_ood else []))
        w.writerows([str(r.path), r.label, f"{r.confidence:.6f}", ";".join(f"{lab}:{p:.6f}" for lab, p in r.top_k)]
                    + ([r.decision or ""] if decides else [])
                    + ([f"{r.ood_score:.6f}" if r.ood_score is not None else "",
                        "yes" if r.outside_training_data else "no"] if checks_ood else []) for r in rows)


def _skip(path: Path, reason: str) -> None:
    print(f"skipped {path}: {reason}", file=sys.stderr)


def _classify(predictor: BundlePredictor, images: list[str], csv_path: Path | None, top_k: int, as_json: bool = False
              ) -> int:
    """Predict, write the CSV (``csv_path`` None: none, as under ``--json`` without ``--csv``), print."""
    from core.latency import provider_words

    out = sys.stderr if as_json else sys.stdout
    runs_on = provider_words(predictor.provider)
    print(f"running on {runs_on} (ONNX Runtime {predictor.provider})", file=out)
    print(predictor.calibration.describe(), file=out)
    rows = predictor.predict(_expand(images), top_k, on_skip=_skip)
    if csv_path is not None:
        _write_predictions(rows, csv_path, predictor.calibration.threshold is not None,
                           predictor.calibration.ood_threshold is not None)
    print(f"{len(rows)} images classified" + (f" -> {csv_path}" if csv_path is not None else ""), file=out)
    if flagged := sum(r.outside_training_data for r in rows):
        print(f"{flagged} image(s) look unlike the images the model was trained on; their answers are not reliable "
              f"(outside_training_data = yes in the {'CSV' if csv_path is not None else 'JSON'})", file=out)
    if as_json:
        from workbench.predictor import as_dict

        print_json([{**as_dict(r), "runs_on": runs_on, "provider": predictor.provider} for r in rows])
    return 0 if rows else EXIT_FAILED


def _predict_run(run_id: int, images: list[str], csv_path: Path | None, top_k: int, as_json: bool = False,
                 device: str = "auto") -> int:
    """Predict with a run's verified fp32 ONNX (the same predictor as for a bundle), calibrated
    with the temperature and threshold of the run's latest evaluation, as its bundle would be."""
    from core.train.robustness import DeviceError
    from workbench.evaluations import EvaluationError, UnknownRunError, latest_evaluation
    from workbench.exports import ensure_fp32

    try:
        exp = ensure_fp32(run_id, progress=_progress)
    except (DeviceError, UnknownRunError) as e:  # WORKBENCH_DEVICE (a first export times the model), no such run
        return fail(str(e))
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not exp.passed:
        print(f"error: run {run_id}'s ONNX export failed verification; not used for predictions", file=sys.stderr)
        return 1
    ev = latest_evaluation(run_id)
    try:
        predictor = BundlePredictor.from_onnx(exp.path, ev.metrics if ev else None, device=device)
    except BundleError as e:
        print(f"error: run {run_id}'s ONNX export cannot be used: {e}", file=sys.stderr)
        return 1
    return _classify(predictor, images, csv_path, top_k, as_json)


def _predict_bundle(target: Path, images: list[str], csv_path: Path | None, top_k: int, allow_unsigned: bool,
                    as_json: bool = False, device: str = "auto") -> int:
    """A bundle is data: checked against its manifest (and signature), its model loaded in-process.
    Its predict.py is never imported or run."""
    from workbench.settings import get_settings

    try:
        bundle = open_bundle(target, key=get_settings().bundle_key, allow_unsigned=allow_unsigned)
        predictor = BundlePredictor.from_bundle(bundle, device=device)
    except BundleError as e:  # the bundle given is bad input, like an unknown run or dataset
        return fail(f"refusing bundle {target}: {e}")
    note = bundle.signature.value
    if bundle.signature is Signature.UNSIGNED:
        note += " (accepted with --allow-unsigned)" if allow_unsigned else " (no WORKBENCH_BUNDLE_KEY configured here)"
    print(f"bundle {target}: {len(bundle.files)} files match its manifest; {note}",
          file=sys.stderr if as_json else sys.stdout)
    return _classify(predictor, images, csv_path, top_k, as_json)


def _expand(inputs: list[str]) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif", ".dcm"}
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in exts)
        elif p.is_file():
            out.append(p)
        else:
            print(f"warning: {s} is not a file or folder", file=sys.stderr)
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from core.train.robustness import DeviceError
    from workbench.compute import check_ort_device

    try:
        device = check_ort_device(args.device)  # before any file is read or written
    except DeviceError as e:
        return fail(str(e))
    target = Path(args.target)
    # --json writes nothing but stdout: the CSV only when asked for by name.
    csv_path = Path(args.csv) if args.csv else None if args.json else Path(DEFAULT_CSV)
    # A folder named like a run id ("42") is the run; write ./42 for such a bundle folder.
    if (target.suffix == ".zip" and target.is_file()) or (target.is_dir() and not is_id(args.target)):
        return _predict_bundle(target, args.images, csv_path, args.top_k, args.allow_unsigned, args.json, device)
    if not is_id(args.target):  # only ASCII digits are a run id: int() reads "٤٢" as 42, and refuses "²"
        return fail(f"{args.target!r} is neither a bundle (.zip or unpacked folder) nor a run id")
    return _predict_run(int(args.target), args.images, csv_path, args.top_k, args.json, device)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a run on its held-out test split")
    p.add_argument("run", type=id_arg("RUN"), metavar="RUN")
    p.add_argument("--tta", action="store_true", help="also evaluate with horizontal-flip test-time augmentation")
    p.add_argument("--sensitivity", type=float, default=0.95,
                   help="two-class tasks: target sensitivity for the operating threshold (default 0.95)")
    p.add_argument("--positive-class", default=None, help="two-class tasks: the positive class (default: the second)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where PyTorch runs the model: auto, cpu, cuda, cuda:N (default: WORKBENCH_DEVICE, else auto)")
    add_json_flag(p)
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("export", help="build a verified deploy bundle (zip) for a run")
    p.add_argument("run", type=id_arg("RUN"), metavar="RUN")
    p.add_argument("--fp16", action="store_true", help="add model_fp16.onnx (fp16 weights and compute)")
    p.add_argument("--int8", action="store_true", help="add model_int8.onnx (static int8, QDQ, per-channel)")
    p.add_argument("--uint8", action="store_true", help="add model_uint8.onnx (uint8 NHWC input, resize inside)")
    p.add_argument("-o", "--output", type=Path, default=None, help="where to copy the bundle zip")
    add_json_flag(p)
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("predict", help="classify images with a bundle (zip/folder) or a run")
    p.add_argument("target", metavar="BUNDLE_OR_RUN")
    p.add_argument("images", nargs="+", metavar="IMAGES")
    p.add_argument("--csv", default=None,
                   help=f"where to write the predictions (default {DEFAULT_CSV}; with --json: no CSV unless given)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--allow-unsigned", action="store_true",
                   help="accept an unsigned bundle although WORKBENCH_BUNDLE_KEY is set (its files are still checked)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where ONNX Runtime runs the model: auto (a GPU if there is one and onnxruntime-gpu is "
                        "installed), cpu, cuda, cuda:N (default: WORKBENCH_DEVICE, else auto)")
    add_json_flag(p)
    p.set_defaults(func=cmd_predict)

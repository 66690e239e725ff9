#!/usr/bin/env python3
"""Classify images with this Workbench bundle. Needs only: onnxruntime, numpy, Pillow
(and pydicom for DICOM files: `pip install pydicom`).

    python predict.py IMAGE_OR_FOLDER [...] [--csv predictions.csv] [--top-k 3] [--model model.onnx]

Writes a CSV with columns: path, predicted_label, confidence, top_k (label:prob;...), and for a
two-class model with a decision threshold also: decision; and, when calibration.json has an
out-of-distribution check: ood_score, outside_training_data (yes/no). Folders are searched recursively.

Confidences are calibrated: the probabilities are softmax(logits / T) with the temperature T in
calibration.json (fitted on the validation split; 1.0 when there was none). For a two-class model
calibration.json also holds the decision threshold on the positive class's probability, and the
`decision` column names the positive class when its probability is at least that threshold.
Its `ood` part flags images that look unlike the training images: the energy score
-logsumexp(logits) above a threshold set on the validation split (95 % of those images pass);
for a flagged image the predicted label is not reliable.

Preprocessing is read from preprocessing.json next to this file and is an exact copy of
Workbench's (a Workbench test checks the arrays are identical).
DICOM files (.dcm, or any file with the DICM marker) are read like Workbench reads them: modality
LUT, the file's own window if it has one, min-max to 8 bits, MONOCHROME1 inverted, first frame.

The model is given to ONNX Runtime as bytes with its external-data folder set to an empty
temporary folder, so a crafted model.onnx that names other files ("external data") cannot read them.

Before loading anything it checks every file against manifest.json (sha256), so a damaged or
altered model, label list or preprocessing file is refused with the file's name.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif", ".dcm"}
_PIL_INTERP = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


# --- the manifest check: stdlib only ---------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_manifest(folder: Path = HERE) -> list[str]:
    """Check each file listed in manifest.json against its sha256; the names checked, or SystemExit."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"error: {manifest_path} is missing, so this bundle cannot be checked; "
                         "export it again from Workbench")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        items = sorted(files.items())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: manifest.json is not readable ({e}); export the bundle again") from None
    for name, want in items:
        if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
            raise SystemExit(f"error: manifest.json lists an unsafe file name {name!r}")
        path = folder / name
        if not path.is_file():
            raise SystemExit(f"error: {name}: listed in manifest.json but missing from the bundle")
        if sha256_file(path) != want:
            raise SystemExit(f"error: {name}: sha256 does not match the manifest (bundle altered?)")
    return [name for name, _ in items]


# --- image decoding: same rules as Workbench's core.images.load_rgb -------------------------
def is_dicom(path: str | Path) -> bool:
    """DICOM Part 10 files carry 'DICM' at byte 128."""
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def load_dicom(path: str | Path) -> Image.Image:
    """Same conversion as Workbench's core.images (a Workbench test checks the pixels are identical)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise RuntimeError("reading DICOM needs pydicom: pip install pydicom") from None
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # first frame of a multi-frame series
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") and arr.ndim == 3:
        return Image.fromarray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr, "RGB")
    values = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        values = apply_voi_lut(values, ds)
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":  # 0 = white in MONOCHROME1
        scaled = 1.0 - scaled
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L").convert("RGB")


def _open_heif_support(path: str | Path) -> None:
    """HEIC/HEIF (phone photos) need the optional pillow-heif package; say so plainly if it is missing."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] != b"ftyp" or head[8:12] not in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1",
                                                    b"msf1"):
        return
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        raise SystemExit(f"error: {path} is a HEIC/HEIF photo; reading it needs the pillow-heif package: "
                         "pip install pillow-heif (or convert the photo to JPEG)") from None
    register_heif_opener()


def load_rgb(path: str | Path) -> Image.Image:
    """8-bit RGB with EXIF orientation applied; transparency composited on white."""
    if is_dicom(path):
        return load_dicom(path)
    _open_heif_support(path)
    with Image.open(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im.load()
        img = ImageOps.exif_transpose(im)
        mode = img.mode
        if mode == "RGB":
            return img.copy()
        if mode.startswith("I;16") or mode == "I":
            arr = np.clip(np.asarray(img).astype(np.float64), 0, 65535.0)  # full 16-bit range -> 0..255
            return Image.fromarray(np.round(arr * (255.0 / 65535.0)).astype(np.uint8), "L").convert("RGB")
        if mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L").convert("RGB")
        if mode in ("P", "PA"):
            img, mode = img.convert("RGBA"), "RGBA"
        if mode in ("RGBA", "LA", "RGBa", "La"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


# --- preprocessing: copy of core.preprocessing.resize_and_crop / normalize ------------------
def resize_and_crop(img: Image.Image, pre: dict) -> Image.Image:
    """Shorter side to resize_shorter_to keeping aspect, then a centred square crop."""
    res = int(pre["resolution"])
    resize_to = int(round(res / float(pre.get("crop_pct", 1.0))))
    img = img.convert("RGB")
    w, h = img.size
    scale = resize_to / min(w, h)
    nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
    img = img.resize((nw, nh), _PIL_INTERP[pre.get("interpolation", "bicubic")])
    left, top = (nw - res) // 2, (nh - res) // 2
    return img.crop((left, top, left + res, top + res))


def preprocess(img: Image.Image, pre: dict) -> np.ndarray:
    """PIL image -> float32 (3, R, R): x/255, (x - mean) / std, CHW."""
    x = np.asarray(resize_and_crop(img, pre), dtype=np.uint8).astype(np.float32) / 255.0
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(z / T), computed as Workbench does (float64, max subtracted)."""
    z = z.astype(np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --- calibration: the temperature and the two-class decision ---------------------------------
def load_calibration(labels: list, checked: list, folder: Path = HERE) -> dict:
    """calibration.json, checked: {temperature, note, decision: {positive_class, negative_class,
    threshold} or None}. A bundle from before calibration.json existed gets temperature 1.0.
    ``checked``: the names verify_manifest hashed; an unlisted calibration.json is refused."""
    path = folder / "calibration.json"
    if "calibration.json" not in checked:
        if path.exists():
            raise SystemExit("error: calibration.json is not listed in manifest.json (bundle altered?)")
        return {"temperature": 1.0, "calibrated": False, "decision": None,
                "note": "not calibrated: this bundle has no calibration.json"}
    try:
        cal = json.loads(path.read_text())
        temp = cal["temperature"]
        dec = cal.get("decision")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: calibration.json is not readable ({e}); export the bundle again") from None
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not np.isfinite(temp) or temp <= 0:
        raise SystemExit(f"error: calibration.json: temperature must be a positive number, got {temp!r}")
    if dec is not None:
        thr = dec.get("threshold") if isinstance(dec, dict) else None
        ok = (isinstance(dec, dict) and len(labels) == 2 and dec.get("positive_class") in labels
              and dec.get("negative_class") in labels and dec.get("positive_class") != dec.get("negative_class")
              and isinstance(thr, (int, float)) and not isinstance(thr, bool) and 0.0 <= thr <= 1.0)
        if not ok:
            raise SystemExit("error: calibration.json: the decision needs two of the model's classes and a "
                             "threshold between 0 and 1")
    return cal


def energy_score(logits: np.ndarray) -> np.ndarray:
    """-logsumexp(logits) per row, computed as Workbench does (float64, max subtracted)."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))


def ood_threshold(cal: dict) -> float | None:
    """calibration.json's out-of-distribution threshold, checked; None when it has none (older bundles)."""
    ood = cal.get("ood")
    if ood is None:
        return None
    thr = ood.get("threshold") if isinstance(ood, dict) else None
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not np.isfinite(thr):
        raise SystemExit(f"error: calibration.json: ood.threshold must be a finite number, got {thr!r}")
    if ood.get("score", "energy") != "energy":
        raise SystemExit(f"error: calibration.json: ood.score {ood.get('score')!r} is not 'energy'")
    return float(thr)


def decide(probs: np.ndarray, labels: list, decision: dict) -> str:
    """The positive class when its calibrated probability reaches the threshold, else the other class."""
    p = float(probs[labels.index(decision["positive_class"])])
    return decision["positive_class"] if p >= float(decision["threshold"]) else decision["negative_class"]


def find_images(inputs: list[str]) -> list[Path]:
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in EXTENSIONS)
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"error: {s} is not a file or folder")
    return out


def open_model(path, ort):
    """An ONNX Runtime session that can open no file but the model: external data, which a
    crafted model may point at any file, is looked up in an empty folder that is then removed."""
    opts = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as empty:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        return ort.InferenceSession(Path(path).read_bytes(), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with a Workbench ONNX bundle.")
    ap.add_argument("images", nargs="+", help="image files and/or folders")
    ap.add_argument("--csv", default="predictions.csv", help="output CSV (default predictions.csv)")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--model", default=str(HERE / "model.onnx"), help="ONNX file (default model.onnx beside this script)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    checked = verify_manifest()
    model = Path(args.model).resolve()
    if model.parent != HERE or model.name not in checked:
        print(f"note: {model} is not part of this bundle; manifest.json does not cover it", file=sys.stderr)

    import onnxruntime as ort

    labels = json.loads((HERE / "labels.json").read_text())
    pre = json.loads((HERE / "preprocessing.json").read_text())
    cal = load_calibration(labels, checked)
    temperature, decision = float(cal["temperature"]), cal.get("decision")
    if cal.get("calibrated"):
        print(f"confidences calibrated with temperature {temperature:.3f} ({cal.get('note', '')})", file=sys.stderr)
    else:
        print(f"confidences {cal.get('note') or 'not calibrated'}", file=sys.stderr)
    if decision:
        print(f"decision: '{decision['positive_class']}' when its probability is at least "
              f"{float(decision['threshold']):.4f}, else '{decision['negative_class']}'", file=sys.stderr)
    ood_thr = ood_threshold(cal)
    if ood_thr is not None:
        print(f"images whose energy score is above {ood_thr:.3f} are flagged as unlike the training images",
              file=sys.stderr)
    sess = open_model(args.model, ort)
    name = sess.get_inputs()[0].name
    paths = find_images(args.images)
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 2
    k = max(1, min(args.top_k, len(labels)))
    rows, failed, flagged = [], 0, 0
    for i in range(0, len(paths), args.batch_size):
        batch, ok = [], []
        for p in paths[i:i + args.batch_size]:
            try:
                batch.append(preprocess(load_rgb(p), pre))
                ok.append(p)
            except Exception as e:  # one unreadable file must not stop the rest
                print(f"skipped {p}: {e}", file=sys.stderr)
                failed += 1
        if not batch:
            continue
        logits = sess.run(None, {name: np.stack(batch)})[0]
        probs, energy = softmax(logits, temperature), energy_score(logits)
        for p, pr, e in zip(ok, probs, energy):
            order = np.argsort(-pr, kind="stable")[:k]
            row = [str(p), labels[order[0]], f"{pr[order[0]]:.6f}",
                   ";".join(f"{labels[j]}:{pr[j]:.6f}" for j in order)]
            row += [decide(pr, labels, decision)] if decision else []
            if ood_thr is not None:
                flagged += bool(e > ood_thr)
                row += [f"{e:.6f}", "yes" if e > ood_thr else "no"]
            rows.append(row)
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted_label", "confidence", "top_k"] + (["decision"] if decision else [])
                   + (["ood_score", "outside_training_data"] if ood_thr is not None else []))
        w.writerows(rows)
    print(f"{len(rows)} images classified -> {args.csv}" + (f" ({failed} skipped)" if failed else ""))
    if flagged:
        print(f"{flagged} image(s) look unlike the images the model was trained on; their answers are not "
              "reliable (outside_training_data = yes)")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

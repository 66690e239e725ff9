"""Hostile deploy bundles: `workbench predict` treats a bundle as data, never as code.

Every bundle here starts as a real one (a tiny trained checkpoint, exported by the real
builder); each test then damages it the way an attacker or a broken copy would, as a zip and
as an unpacked folder, and runs the real CLI on it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from core.ingest import IngestLimits

KEY = "test-installation-key"
EXIT_BAD_INPUT = 2  # README.md "Exit codes and `--json`": a refused bundle is bad input
OTHER_KEY = "another-installation-key"
Members = dict[str, bytes]


# --- a real bundle -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(ws) -> tuple[Members, list[Path]]:
    """The members of a bundle built by `export_run` (unsigned), and two test images."""
    from builders import exported_run

    with zipfile.ZipFile(exported_run(ws).bundle) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    return members, sorted((ws.source / "test" / "bean_rust").iterdir())[:2]


def build_signed(members: Members, tmp: Path, key: str | None) -> Members:
    """The same model rebuilt by the real builder, signed with ``key``."""
    from core.export import build_bundle
    from core.preprocessing import Preprocessing

    model = tmp / "src_model.onnx"
    model.write_bytes(members["model.onnx"])
    info = {"classes": json.loads(members["labels.json"]), "variant": "lite0", "run_id": 1,
            "preprocessing": Preprocessing.from_dict(json.loads(members["preprocessing.json"]))}
    z = build_bundle(tmp / "signed.zip", {"model.onnx": model}, info, key=key.encode() if key else None)
    with zipfile.ZipFile(z) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


# --- writing a (damaged) bundle as a zip or a folder ---------------------------------------
def as_zip(members: Members, dst: Path) -> Path:
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def as_folder(members: Members, dst: Path) -> Path:
    dst.mkdir()
    for name, data in members.items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes(data)
    return dst


def materialise(members: Members, form: str, tmp: Path) -> Path:
    return as_zip(members, tmp / "bundle.zip") if form == "zip" else as_folder(members, tmp / "bundle")


def predict(target: Path, images: list[Path], tmp: Path, capsys: pytest.CaptureFixture[str],
            *extra: str) -> tuple[int, str, str]:
    from workbench.cli import main

    rc = main(["predict", str(target), *map(str, images), "--csv", str(tmp / "out.csv"), "--top-k", "1", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("WORKBENCH_BUNDLE_KEY", raising=False)


# --- damage ----------------------------------------------------------------------------------
def _rehash(m: Members, name: str) -> None:
    """An attacker who also updates the (unsigned) manifest for the file they changed."""
    import hashlib

    manifest = json.loads(m["manifest.json"])
    manifest["files"][name] = hashlib.sha256(m[name]).hexdigest()
    m["manifest.json"] = json.dumps(manifest).encode()


def _other_model(data: bytes) -> bytes:
    """A different but valid model: the old code would load and run it without a word."""
    import onnx

    proto = onnx.load_from_string(data)
    proto.metadata_props.add(key="tampered", value="yes")
    return proto.SerializeToString()


def _altered_model(m: Members) -> None:
    m["model.onnx"] = _other_model(m["model.onnx"])


def _altered_labels(m: Members) -> None:
    m["labels.json"] = json.dumps(list(reversed(json.loads(m["labels.json"])))).encode()


def _altered_preprocessing(m: Members) -> None:
    pre = json.loads(m["preprocessing.json"])
    pre["mean"] = [0.0, 0.0, 0.0]
    m["preprocessing.json"] = json.dumps(pre).encode()


def _altered_predict_py(m: Members) -> None:
    m["predict.py"] += b"\n# changed\n"


def _no_manifest(m: Members) -> None:
    del m["manifest.json"]


def _missing_file(m: Members) -> None:
    del m["README.md"]


def _extra_file(m: Members) -> None:
    m["notes.txt"] = b"not part of the bundle"


def _extra_folder(m: Members) -> None:
    m["extra/model.onnx"] = m["model.onnx"]


REFUSED: list[tuple[str, Callable[[Members], None], str]] = [
    ("altered model.onnx", _altered_model, "model.onnx: sha256 does not match the manifest (bundle altered?)"),
    ("altered labels.json", _altered_labels, "labels.json: sha256 does not match the manifest (bundle altered?)"),
    ("altered preprocessing.json", _altered_preprocessing,
     "preprocessing.json: sha256 does not match the manifest (bundle altered?)"),
    ("altered predict.py", _altered_predict_py, "predict.py: sha256 does not match the manifest (bundle altered?)"),
    ("missing manifest", _no_manifest, "manifest.json: missing"),
    ("missing file", _missing_file, "README.md: listed in the manifest but missing from the bundle"),
    ("extra file", _extra_file, "notes.txt: not listed in the manifest (unexpected file in the bundle)"),
    ("extra folder", _extra_folder, "extra/"),  # zip: extra/model.onnx is unlisted; folder: extra/ is unexpected
]


# --- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["zip", "folder"])
@pytest.mark.parametrize("damage,message", [(d, msg) for _, d, msg in REFUSED], ids=[c for c, _, _ in REFUSED])
def test_damaged_bundle_refused_naming_the_file(real, form: str, damage: Callable[[Members], None], message: str,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members, images = real
    m = dict(members)
    damage(m)
    rc, _, err = predict(materialise(m, form, tmp_path), images, tmp_path, capsys)
    assert rc == EXIT_BAD_INPUT and message in err, err
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("form", ["zip", "folder"])
@pytest.mark.parametrize("manifest_updated", [False, True], ids=["manifest-stale", "manifest-rehashed"])
def test_predict_py_payload_never_runs(real, form: str, manifest_updated: bool, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A crafted predict.py that writes a marker when imported: refused (manifest stale) or
    simply never loaded (manifest re-hashed by the attacker); the marker never appears."""
    members, images = real
    marker = tmp_path / "PWNED"
    m = dict(members)
    m["predict.py"] = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                       "def main(argv=None):\n    return 0\n").encode()
    if manifest_updated:
        _rehash(m, "predict.py")
    rc, _, err = predict(materialise(m, form, tmp_path), images, tmp_path, capsys)
    assert not marker.exists()
    if manifest_updated:  # consistent bundle, unsigned, no key here: Workbench predicts itself
        assert rc == 0, err
        assert len((tmp_path / "out.csv").read_text().splitlines()) == 3
    else:
        assert rc == EXIT_BAD_INPUT and "predict.py: sha256 does not match the manifest" in err


def _zip_slip(zf: zipfile.ZipFile) -> None:
    zf.writestr("../evil.txt", b"outside")


def _symlink_member(zf: zipfile.ZipFile) -> None:
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, "/etc/passwd")


def _ratio_bomb(zf: zipfile.ZipFile) -> None:
    zf.writestr("padding.bin", bytes(8 * 2**20))  # 8 MiB of zeros deflate about 1000:1


def _many_entries(zf: zipfile.ZipFile) -> None:
    for i in range(100):
        zf.writestr(f"f{i}.txt", b"x")


HOSTILE_ZIPS = [
    ("zip-slip", _zip_slip, "'../evil.txt' has a '..' path component"),
    ("symlink", _symlink_member, "'link' is a symbolic link"),
    ("ratio bomb", _ratio_bomb, "'padding.bin' has a compression ratio"),
    ("too many entries", _many_entries, "entries, over the limit of 64"),
]


@pytest.mark.parametrize("add,message", [(a, msg) for _, a, msg in HOSTILE_ZIPS], ids=[c for c, _, _ in HOSTILE_ZIPS])
def test_hostile_zip_refused_by_the_ingest_guards(real, add: Callable[[zipfile.ZipFile], None], message: str,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members, images = real
    z = as_zip(members, tmp_path / "bundle.zip")
    with zipfile.ZipFile(z, "a", zipfile.ZIP_DEFLATED) as zf:
        add(zf)
    rc, _, err = predict(z, images, tmp_path, capsys)
    assert rc == EXIT_BAD_INPUT and message in err, err
    assert not (tmp_path.parent / "evil.txt").exists()


def _symlinked_labels(folder: Path, outside: Path) -> None:
    (outside / "labels.json").write_bytes((folder / "labels.json").read_bytes())  # same bytes, same hash
    (folder / "labels.json").unlink()
    os.symlink(outside / "labels.json", folder / "labels.json")


def _symlinked_folder(folder: Path, outside: Path) -> None:
    os.symlink(outside, folder / "more")


@pytest.mark.parametrize("link,message", [
    (_symlinked_labels, "labels.json: symbolic link"),
    (_symlinked_folder, "more/: symbolic link"),
], ids=["symlinked file", "symlinked folder"])
def test_symlink_in_folder_bundle_refused(real, link: Callable[[Path, Path], None], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    members, images = real
    folder = as_folder(members, tmp_path / "bundle")
    outside = tmp_path / "outside"
    outside.mkdir()
    link(folder, outside)
    rc, _, err = predict(folder, images, tmp_path, capsys)
    assert rc == EXIT_BAD_INPUT and message in err, err


@pytest.mark.parametrize("form", ["zip", "folder"])
def test_oversized_member_refused(real, form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import core.bundle

    members, images = real
    monkeypatch.setattr(core.bundle, "BUNDLE_LIMITS", IngestLimits(max_entries=64, max_file_bytes=2**20))
    rc, _, err = predict(materialise(members, form, tmp_path), images, tmp_path, capsys)
    assert rc == EXIT_BAD_INPUT and "model.onnx: larger than the limit of 1,048,576 bytes" in err, err


# --- signatures -------------------------------------------------------------------------------
def _tamper_signature(m: Members) -> None:
    manifest = json.loads(m["manifest.json"])
    value = manifest["signature"]["value"]
    manifest["signature"]["value"] = ("0" if value[0] != "0" else "1") + value[1:]
    m["manifest.json"] = json.dumps(manifest).encode()


UNCHECKED_WORDS = "carries a signature that could not be checked here (no WORKBENCH_BUNDLE_KEY is configured)"


def _resign_free_model_swap(m: Members) -> None:
    """Swap the model and re-hash it in the manifest: without the key the signature cannot follow."""
    m["model.onnx"] = _other_model(m["model.onnx"])
    _rehash(m, "model.onnx")


SIGNING = [
    # (case, signed with, key configured, damage, extra args, expected rc, expected text)
    ("signed, verified", KEY, KEY, None, (), 0, "signed by this installation's key"),
    ("tampered signature", KEY, KEY, _tamper_signature, (), 2, "signature does not match this installation's key"),
    ("model swapped, manifest re-hashed", KEY, KEY, _resign_free_model_swap, (), 2,
     "signature does not match this installation's key"),
    ("signed with another key", OTHER_KEY, KEY, None, (), 2, "signature does not match this installation's key"),
    ("unsigned while a key is set", None, KEY, None, (), 2, "unsigned"),
    ("unsigned, --allow-unsigned", None, KEY, None, ("--allow-unsigned",), 0, "accepted with --allow-unsigned"),
    ("unsigned, no key here", None, None, None, (), 0, "no WORKBENCH_BUNDLE_KEY configured here"),
    # Without the key a good signature and a stale one (model swapped, manifest re-hashed) look
    # the same: neither is called signed.
    ("signature, no key here", KEY, None, None, (), 0, UNCHECKED_WORDS),
    ("stale signature, no key here", KEY, None, _resign_free_model_swap, (), 0, UNCHECKED_WORDS),
]
SIGNED = re.compile(r"(?<!un)signed|verified", re.IGNORECASE)


@pytest.mark.parametrize("form", ["zip", "folder"])
@pytest.mark.parametrize("signed_with,configured,damage,extra,want_rc,text", [c[1:] for c in SIGNING],
                         ids=[c[0] for c in SIGNING])
def test_signature(real, form: str, signed_with: str | None, configured: str | None,
                   damage: Callable[[Members], None] | None, extra: tuple[str, ...], want_rc: int, text: str,
                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    members, images = real
    m = build_signed(members, tmp_path, signed_with)
    assert ("signature" in json.loads(m["manifest.json"])) == (signed_with is not None)
    if damage:
        damage(m)
    if configured:
        monkeypatch.setenv("WORKBENCH_BUNDLE_KEY", configured)
    rc, out, err = predict(materialise(m, form, tmp_path), images, tmp_path, capsys, *extra)
    assert rc == want_rc and text in (out if want_rc == 0 else err), (out, err)
    if want_rc == 0:  # "signed" only where the signature was checked here and held
        assert bool(SIGNED.search(out)) == (configured is not None and signed_with == configured), out


def test_an_unchecked_signature_is_not_called_signed_by_the_server(real, tmp_path: Path) -> None:
    """/metadata (the prediction server) on a machine without the key: the signature it carries is
    reported as unchecked, in the same words as `workbench predict`."""
    from fastapi.testclient import TestClient

    from workbench.predictor import Predictor
    from workbench.serve import create_app

    members, _ = real
    m = build_signed(members, tmp_path, KEY)
    _resign_free_model_swap(m)  # a stale signature: nothing here can tell
    meta = TestClient(create_app(Predictor.load(as_zip(m, tmp_path / "bundle.zip")))).get("/metadata").json()
    assert UNCHECKED_WORDS in meta["bundle"]["signature"]
    assert not SIGNED.search(json.dumps(meta)), meta["bundle"]["signature"]


@pytest.mark.parametrize("target", ["zip", "folder"])
def test_serve_refuses_a_damaged_bundle_as_bad_input(real, target: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.cli import main

    m = dict(real[0])
    _altered_model(m)
    assert main(["serve", str(materialise(m, target, tmp_path))]) == EXIT_BAD_INPUT
    assert "model.onnx: sha256 does not match the manifest" in capsys.readouterr().err


def test_predict_json_writes_nothing_but_stdout(real, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`predict --json` used to leave predictions.csv in the working folder; now only --csv FILE writes."""
    from workbench.cli import main

    members, images = real
    bundle = as_zip(members, tmp_path / "bundle.zip")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["predict", str(bundle), *map(str, images), "--json"]) == 0
    out = capsys.readouterr()
    assert [Path(r["image"]) for r in json.loads(out.out)] == images
    assert list(work.iterdir()) == [] and "->" not in out.err
    asked = tmp_path / "asked.csv"
    assert main(["predict", str(bundle), *map(str, images), "--json", "--csv", str(asked)]) == 0
    assert len(asked.read_text().splitlines()) == 3 and list(work.iterdir()) == []
    json.loads(capsys.readouterr().out)
    assert main(["predict", str(bundle), *map(str, images)]) == 0  # without --json: ./predictions.csv, as before
    assert [p.name for p in work.iterdir()] == ["predictions.csv"]


def test_signature_covers_canonical_manifest() -> None:
    from core.bundle import check_signature, make_manifest

    manifest = make_manifest({"model.onnx": "a" * 64, "labels.json": "b" * 64, "preprocessing.json": "c" * 64},
                             run_id=3, key=KEY.encode())
    reordered = json.loads(json.dumps(dict(reversed(list(manifest.items())))))  # key order does not matter
    assert check_signature(reordered, KEY.encode()).name == "VALID"
    reordered["run_id"] = "4"  # any field, not only the hashes
    with pytest.raises(ValueError, match="signature does not match"):
        check_signature(reordered, KEY.encode())


# --- the bundle's own predict.py checks the manifest too --------------------------------------
def _bundle_predict_module(folder: Path):
    spec = importlib.util.spec_from_file_location("unpacked_bundle_predict", folder / "predict.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]  # our own template, from a real bundle
    return mod


@pytest.mark.parametrize("damage,message", [
    (None, ""),
    (_altered_model, "model.onnx: sha256 does not match the manifest (bundle altered?)"),
    (_altered_labels, "labels.json: sha256 does not match the manifest (bundle altered?)"),
    (_no_manifest, "manifest.json is missing"),
], ids=["intact", "altered model", "altered labels", "no manifest"])
def test_bundle_predict_py_checks_its_manifest(real, damage: Callable[[Members], None] | None, message: str,
                                               tmp_path: Path) -> None:
    members, images = real
    m = dict(members)
    if damage:
        damage(m)
    folder = as_folder(m, tmp_path / "bundle")
    mod = _bundle_predict_module(folder)
    args = [*map(str, images), "--csv", str(tmp_path / "out.csv")]
    if not damage:
        assert set(mod.verify_manifest()) == set(members) - {"manifest.json"}
        assert mod.main(args) == 0
        return
    with pytest.raises(SystemExit, match=re.escape(message)):
        mod.main(args)
    assert not (tmp_path / "out.csv").exists()

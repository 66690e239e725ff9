"""A crafted model.onnx opens no file outside its bundle (issue 26, item 1).

ONNX lets a tensor keep its bytes in an "external data" file named by path, and ONNX Runtime
reads that file. Each case below builds a small, real classifier whose bias tensor sits in one
of the places the ONNX protobuf allows a tensor (initializer, sparse initializer values and
indices, Constant attributes, tensor lists, If branches two deep, function bodies, training
graphs) and points it at ``secret.bin`` in the working directory. The bundle around it is
written by the real builder, then opened through every front-end: ``workbench predict``,
``Predictor.load`` and ``workbench serve``.

Whether a file was opened is watched with Linux inotify on the folders that hold the secret:
it sees ONNX Runtime's own C++ ``open`` calls, which Python's audit hooks cannot. A control case
shows the watcher does see ONNX Runtime read the secret when the model is loaded unguarded.
"""
from __future__ import annotations

import ctypes
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")

SECRET = "secret.bin"
CLASSES = ["a", "b", "c"]
RESOLUTION = 16


# --- watching opens ----------------------------------------------------------------------------
class OpenWatch:
    """The names of files opened in some folders while it watches, by any code of any process."""

    IN_OPEN, IN_ACCESS = 0x20, 0x01

    def __init__(self, *folders: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for folder in folders:
            wd = self._libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_OPEN | self.IN_ACCESS)
            assert wd >= 0, os.strerror(ctypes.get_errno())

    def opened(self) -> set[str]:
        names: set[str] = set()
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            i = 0
            while i < len(buf):
                _, _, _, length = struct.unpack_from("iIII", buf, i)
                names.add(buf[i + 16:i + 16 + length].rstrip(b"\0").decode())
                i += 16 + length
        os.close(self.fd)
        return names


# --- crafted models: a real 3-class classifier whose bias may name a file ---------------------
def _external(name: str, dims: list[int], dtype: int = TensorProto.FLOAT) -> TensorProto:
    t = TensorProto(name=name, data_type=dtype, dims=dims, data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value=SECRET)
    return t


def _bias_inline(name: str = "bias") -> TensorProto:
    return numpy_helper.from_array(np.zeros(3, np.float32), name)


def _graph(nodes: list, initializers: list | None = None, sparse: list | None = None) -> onnx.GraphProto:
    """logits = mean of x over (H, W) @ I + bias, where ``nodes`` produce ``bias``."""
    head = [helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("Add", ["pooled", "bias"], ["logits"])]
    return helper.make_graph(
        nodes + head, "crafted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, RESOLUTION, RESOLUTION])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        initializer=initializers or [], sparse_initializer=sparse or [])


def _sparse(values: TensorProto, indices: TensorProto) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(values, indices, [3])


def _initializer() -> onnx.ModelProto:
    return _model(_graph([], [_external("bias", [3])]))


def _sparse_values() -> onnx.ModelProto:
    idx = numpy_helper.from_array(np.arange(3, dtype=np.int64), "idx")
    return _model(_graph([], sparse=[_sparse(_external("bias", [3]), idx)]))


def _sparse_indices() -> onnx.ModelProto:
    vals = _bias_inline()
    return _model(_graph([], sparse=[_sparse(vals, _external("idx", [3], TensorProto.INT64))]))


def _constant_value() -> onnx.ModelProto:
    return _model(_graph([helper.make_node("Constant", [], ["bias"], value=_external("v", [3]))]))


def _constant_sparse_value() -> onnx.ModelProto:
    idx = numpy_helper.from_array(np.arange(3, dtype=np.int64), "idx")
    sparse = _sparse(_external("v", [3]), idx)
    return _model(_graph([helper.make_node("Constant", [], ["bias"], sparse_value=sparse)]))


def _tensor_list_attribute() -> onnx.ModelProto:
    node = helper.make_node("Constant", [], ["bias"], value=_bias_inline("v"))
    node.attribute.append(helper.make_attribute("extra", [_external("t", [3])]))
    return _model(_graph([node]))


def _branch(tensor: TensorProto) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("Constant", [], ["b"], value=tensor)], "branch", [],
                             [helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])])


def _if(then: onnx.GraphProto, output: str) -> list:
    cond = helper.make_node("Constant", [], ["cond_" + output], value=numpy_helper.from_array(np.array(True), "c"))
    return [cond, helper.make_node("If", ["cond_" + output], [output], then_branch=then,
                                   else_branch=_branch(_bias_inline("e")))]


def _nested_if_branch() -> onnx.GraphProto:
    inner = _if(_branch(_external("deep", [3])), "b")
    return helper.make_graph(inner, "outer", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])])


def _if_branch_two_deep() -> onnx.ModelProto:
    return _model(_graph(_if(_nested_if_branch(), "bias")))


def _function_body() -> onnx.ModelProto:
    body = [helper.make_node("Constant", [], ["b"], value=_external("f", [3]))]
    fn = helper.make_function("wb.crafted", "Bias", [], ["b"], body, [helper.make_opsetid("", 17)])
    m = _model(_graph([helper.make_node("Bias", [], ["bias"], domain="wb.crafted")]))
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("wb.crafted", 1))
    return m


def _training_graph() -> onnx.ModelProto:
    m = _model(_graph([], [_bias_inline()]))
    init = helper.make_graph([], "init", [], [], initializer=[_external("t", [3])])
    m.training_info.append(onnx.TrainingInfoProto(initialization=init))
    return m


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


CRAFTED: list[tuple[str, Callable[[], onnx.ModelProto], str]] = [
    ("initializer", _initializer, "graph ('crafted').initializer[0] ('bias')"),
    ("sparse initializer values", _sparse_values, "sparse_initializer[0].values ('bias')"),
    ("sparse initializer indices", _sparse_indices, "sparse_initializer[0].indices ('idx')"),
    ("Constant value", _constant_value, "attribute[0] ('value').t ('v')"),
    ("Constant sparse_value", _constant_sparse_value, "('sparse_value').sparse_tensor.values ('v')"),
    ("tensor list attribute", _tensor_list_attribute, "('extra').tensors[0] ('t')"),
    ("If branch two deep", _if_branch_two_deep,
     "('then_branch').g ('outer').node[1].attribute[1] ('then_branch').g ('branch')"),
    ("function body", _function_body, "functions[0] ('Bias').node[0]"),
    ("training graph", _training_graph, "training_info[0].initialization ('init')"),
]
IDS = [c for c, _, _ in CRAFTED]


@pytest.fixture
def secret_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding the file a crafted model asks for, and a data dir beside it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / SECRET).write_bytes(np.arange(64, dtype=np.float32).tobytes())
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("WORKBENCH_BUNDLE_KEY", raising=False)
    return cwd


def crafted_bundle(model: onnx.ModelProto, folder: Path) -> Path:
    """A bundle around ``model``, written by the real builder (unsigned)."""
    from core.export import build_bundle
    from core.preprocessing import Preprocessing

    folder.mkdir(exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    info = {"classes": CLASSES, "variant": "lite0", "run_id": 1,
            "preprocessing": Preprocessing(resolution=RESOLUTION)}
    return build_bundle(folder / "bundle.zip", {"model.onnx": path}, info)


def _image(folder: Path) -> Path:
    from PIL import Image

    p = folder / "leaf.png"
    Image.new("RGB", (24, 24), (90, 140, 60)).save(p)
    return p


def _predict(bundle: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from workbench.cli import main

    rc = main(["predict", str(bundle), str(image), "--csv", str(bundle.parent / "out.csv")])
    return rc, capsys.readouterr().err


def _predictor_load(bundle: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from core.bundle import BundleError
    from workbench.predictor import Predictor

    try:
        Predictor.load(bundle)
    except BundleError as e:
        return 1, str(e)
    return 0, ""


def _serve(bundle: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    import uvicorn

    from workbench.cli import main

    with pytest.MonkeyPatch.context() as mp:  # a bundle that loads would serve: return instead of listening
        mp.setattr(uvicorn, "run", lambda *a, **k: None)
        rc = main(["serve", str(bundle)])
    return rc, capsys.readouterr().err


def _bundle_predict_py(bundle: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The bundle's own predict.py, run from the unpacked bundle as a user would."""
    import importlib.util
    import zipfile

    folder = bundle.parent / "unpacked"
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(folder)
    spec = importlib.util.spec_from_file_location("crafted_bundle_predict", folder / "predict.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]  # our own template, written by build_bundle
    try:
        rc = mod.main([str(image), "--csv", str(bundle.parent / "out.csv")])
    except Exception as e:  # ONNX Runtime's own error: the model names a file it did not find
        return 1, str(e)
    return rc, capsys.readouterr().err


FRONT_ENDS = {"workbench predict": _predict, "Predictor.load": _predictor_load, "workbench serve": _serve}
EVERY_READER = {**FRONT_ENDS, "the bundle's predict.py": _bundle_predict_py}


@pytest.mark.parametrize("build,where", [c[1:] for c in CRAFTED], ids=IDS)
def test_every_tensor_location_is_found(build: Callable[[], onnx.ModelProto], where: str) -> None:
    from core.onnx_files import file_references

    refs = file_references(build())
    assert len(refs) == 1 and where in refs[0] and refs[0].endswith(f"-> {SECRET!r}"), refs


@pytest.mark.parametrize("front_end", EVERY_READER)
@pytest.mark.parametrize("build", [c[1] for c in CRAFTED], ids=IDS)
def test_crafted_model_opens_no_file(build: Callable[[], onnx.ModelProto], front_end: str, secret_cwd: Path,
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = crafted_bundle(build(), tmp_path / "bundle")
    image = _image(tmp_path)
    watch = OpenWatch(secret_cwd, bundle.parent)
    rc, err = EVERY_READER[front_end](bundle, image, capsys)
    opened = watch.opened()
    assert SECRET not in opened, f"{front_end} let ONNX Runtime open {SECRET}"
    if front_end in FRONT_ENDS:  # Workbench itself refuses, naming what and where, and writes nothing
        assert not (bundle.parent / "out.csv").exists()
        assert rc != 0 and "refers to external data files" in err and SECRET in err, (rc, err)


@pytest.mark.parametrize("build", [c[1] for c in CRAFTED], ids=IDS)
def test_even_an_unchecked_model_finds_no_file(build: Callable[[], onnx.ModelProto], secret_cwd: Path) -> None:
    """The second layer alone: a session made the guarded way from the raw crafted bytes."""
    from core.onnx_files import session_without_files

    watch = OpenWatch(secret_cwd)
    try:
        session_without_files(build().SerializeToString())
    except Exception:  # ONNX Runtime refuses the missing file, or the graph: either way nothing was read
        pass
    assert SECRET not in watch.opened()


def test_the_watcher_sees_onnx_runtime_read_the_secret_when_unguarded(secret_cwd: Path) -> None:
    """The control: without the guard, ONNX Runtime reads the secret, and the watcher sees it."""
    import onnxruntime as ort

    watch = OpenWatch(secret_cwd)
    sess = ort.InferenceSession(_sparse_values().SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"x": np.zeros((1, 3, RESOLUTION, RESOLUTION), np.float32)})[0]
    assert SECRET in watch.opened()
    assert logits.tolist() == [[0.0, 1.0, 2.0]]  # the first 12 bytes of the secret, as floats


def test_a_clean_model_still_predicts(secret_cwd: Path, tmp_path: Path) -> None:
    from workbench.predictor import Predictor

    model = _model(_graph([], [_bias_inline()]))
    predictor = Predictor.load(crafted_bundle(model, tmp_path / "bundle"))
    rows = predictor.predict([_image(tmp_path)])
    assert [r.label for r in rows] == ["b"]  # the logits are the mean of each channel: green is largest
    assert 0.33 < rows[0].confidence < 1.0

"""MTCNN's networks on ONNX Runtime, built from facenet-pytorch's own weight files, no torch.

facenet-pytorch 2.6 ships its PNet/RNet/ONet weights as legacy (pre-zip) `torch.save` files:
a few pickles followed by the raw float32 storages. `read_state_dict` reads them with a
restricted unpickler that knows three globals (an OrderedDict, a float storage and the
tensor rebuild call) and maps every tensor onto numpy; anything else in the pickle is refused.
`onet_graph` lays the same layers as `worker.mtcnn.ONet` (Caffe's W-before-H flattening
included) out as an ONNX graph with fixed IR version, opset and producer fields, so the bytes,
and hence their sha256, depend only on the weights: `ONET_ONNX_SHA256` pins them and
`tests/test_onet.py` checks the outputs against the torch port.

Why build rather than export with torch once and ship the file: the weights stay the ones
facenet-pytorch publishes (their sha256 is checked first), the install needs neither torch
nor a file of ours that no registry carries, and the build is reproducible on any machine.
"""

from __future__ import annotations

import io
import logging
import pickle
import struct
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.errors import ModelChecksumMismatch, ModelError
from worker.models import InferenceModel, resolve_model, sha256_of, write_cache_file
from worker.runtime import onnx_session

if TYPE_CHECKING:
    from worker.models import ModelFiles
    from worker.settings import PipelineSettings
    from worker.types import ModelInfo

logger = logging.getLogger(__name__)

ONET_ONNX_SHA256 = "7b23bbb0e20c41cb30617722f5d7c10637d69fe71f729f45541751848b3ea997"
"""sha256 of the ONNX graph `onet_graph` builds from facenet-pytorch 2.6.0's onet.pt."""

ONET_CHUNK = 512
"""Crops per ONet call: bounds memory (ONet's first activation takes 270 KB per crop)."""

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
    """A float32 storage named in the pickle; its bytes follow the pickles."""

    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.size = size
        self.data: NDArray[np.float32] | None = None


class _TensorRef:
    def __init__(
        self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def array(self) -> NDArray[np.float32]:
        data = self.storage.data
        if data is None:
            raise ModelError(f"storage {self.storage.key} has no data")
        need = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        if self.shape and need >= len(data):
            raise ModelError(f"a tensor of shape {self.shape} runs past its storage")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.shape, strides=[4 * s for s in self.stride]
        )
        return np.array(view, np.float32)


def _rebuild_tensor(
    storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _TensorRef:
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


class _FloatStorage:
    """Stands for `torch.FloatStorage` in persistent ids; never instantiated."""


class _StateDictUnpickler(pickle.Unpickler):
    _GLOBALS = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch", "FloatStorage"): _FloatStorage,
    }

    def __init__(self, fh: io.BufferedReader, storages: dict[str, _Storage]) -> None:
        super().__init__(fh)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        found = self._GLOBALS.get((module, name))
        if found is None:
            raise ModelError(f"unexpected object {module}.{name} in a weight file")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        # ("storage", type, key, location, size, view): views of storages are not read.
        storage_id = isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
        if not storage_id or pid[5] is not None:
            raise ModelError(f"unexpected persistent id {pid!r} in a weight file")
        _, kind, key, _location, size, _view = pid
        if kind is not _FloatStorage:
            raise ModelError(f"weight file holds a {kind} storage; only float32 is read")
        return self.storages.setdefault(str(key), _Storage(str(key), int(size)))


def read_state_dict(path: str | Path) -> dict[str, NDArray[np.float32]]:
    """The float32 tensors of a legacy `torch.save` state dict, as numpy arrays, without torch."""
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as fh:
        try:
            magic = pickle.load(fh)  # noqa: S301 - plain ints and dicts
            if magic != _LEGACY_MAGIC:
                raise ModelError(f"{path} is not a legacy torch.save file")
            pickle.load(fh)  # protocol version
            sys_info = pickle.load(fh)
            if not sys_info.get("little_endian", False):
                raise ModelError(f"{path} was saved big-endian")
            refs = _StateDictUnpickler(fh, storages).load()  # type: ignore[arg-type]
            keys = pickle.load(fh)
        except (pickle.UnpicklingError, EOFError, AttributeError) as exc:
            raise ModelError(f"cannot read weight file {path}: {exc}") from exc
        for key in keys:
            storage = storages.get(str(key))
            if storage is None:
                raise ModelError(f"{path}: storage {key} is not used by any tensor")
            (count,) = struct.unpack("<q", fh.read(8))
            raw = fh.read(4 * count)
            if count != storage.size or len(raw) != 4 * count:
                raise ModelError(f"{path}: storage {key} is truncated")
            storage.data = np.frombuffer(raw, "<f4")
    if not isinstance(refs, OrderedDict):
        raise ModelError(f"{path} does not hold a state dict")
    return {name: ref.array() for name, ref in refs.items()}


def onet_graph(weights: dict[str, NDArray[np.float32]]) -> bytes:
    """ONet (`worker.mtcnn.ONet`) as serialised ONNX: (N,3,48,48) normalised crops in;
    `offsets` (N,4), `landmarks` (N,10) and `probability` (N,) out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, value: NDArray[np.float32] | NDArray[np.int64]) -> str:
        # copy(order="C"), not ascontiguousarray: that makes a 0-d index 1-d.
        inits.append(numpy_helper.from_array(value.copy(order="C"), name))
        return name

    def weight(name: str, shape: tuple[int, ...] | None = None) -> str:
        if name not in weights:
            raise ModelError(f"ONet weights miss {name}")
        value = weights[name]
        return init(name, value.reshape(shape) if shape else value)

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    x = "crops"
    for i, pool in ((1, (3, 2)), (2, (3, 2)), (3, (2, 2)), (4, None)):
        channels = weights[f"prelu{i}.weight"].shape[0]
        x = node("Conv", [x, weight(f"conv{i}.weight"), weight(f"conv{i}.bias")], f"conv{i}")
        x = node("PRelu", [x, weight(f"prelu{i}.weight", (channels, 1, 1))], f"prelu{i}")
        if pool:
            kernel, stride = pool
            x = node(
                "MaxPool",
                [x],
                f"pool{i}",
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                ceil_mode=1,
            )
    # Caffe flattens W before H: the dense weights expect (N, W, H, C) order.
    x = node("Transpose", [x], "caffe_order", perm=[0, 3, 2, 1])
    x = node("Reshape", [x, init("flat_shape", np.array([0, -1], np.int64))], "flat")
    x = node("Gemm", [x, weight("dense5.weight"), weight("dense5.bias")], "dense5", transB=1)
    x = node("PRelu", [x, weight("prelu5.weight")], "prelu5")
    logits = node(
        "Gemm", [x, weight("dense6_1.weight"), weight("dense6_1.bias")], "dense6_1", transB=1
    )
    soft = node("Softmax", [logits], "softmax", axis=1)
    node("Gather", [soft, init("face_class", np.array(1, np.int64))], "probability", axis=1)
    node("Gemm", [x, weight("dense6_2.weight"), weight("dense6_2.bias")], "offsets", transB=1)
    node("Gemm", [x, weight("dense6_3.weight"), weight("dense6_3.bias")], "landmarks", transB=1)

    def tensor(name: str, *dims: str | int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))

    graph = helper.make_graph(
        nodes,
        "mtcnn_onet",
        [tensor("crops", "n", 3, 48, 48)],
        [tensor("offsets", "n", 4), tensor("landmarks", "n", 10), tensor("probability", "n")],
        inits,
    )
    # Fixed versions and producer: the bytes must not depend on the installed onnx.
    model = helper.make_model(
        graph,
        ir_version=8,
        opset_imports=[helper.make_opsetid("", 13)],
        producer_name="aftertrip-faces",
        producer_version="1",
    )
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _cached_onnx(settings: PipelineSettings) -> Path:
    """Where ONet's ONNX is kept in the model cache."""
    return settings.model_cache_dir / f"mtcnn_onet.{ONET_ONNX_SHA256[:16]}.onnx"


def onet_onnx(settings: PipelineSettings, info: ModelInfo) -> bytes:
    """ONet's ONNX bytes: from the model cache when built before, else built from `info`'s
    weights and cached; either way checked against `ONET_ONNX_SHA256`."""
    cached = _cached_onnx(settings)
    if cached.is_file() and sha256_of(cached) == ONET_ONNX_SHA256:
        return cached.read_bytes()
    import hashlib

    data = onet_graph(read_state_dict(info.path))
    actual = hashlib.sha256(data).hexdigest()
    if actual != ONET_ONNX_SHA256:
        raise ModelChecksumMismatch(
            f"the ONNX graph built from {info.path} has sha256 {actual}, expected "
            f"{ONET_ONNX_SHA256}: reinstall the weights with `pip install --force-reinstall "
            "--no-deps facenet-pytorch==2.6.0`, or report this with your onnx version"
        )
    try:
        write_cache_file(cached, data)
    except OSError as exc:  # a read-only cache only costs a rebuild per process
        logger.warning("cannot cache %s: %s", cached, exc)
    return data


def square_boxes(boxes: NDArray[np.float32]) -> NDArray[np.float32]:
    """Boxes grown to squares around their centres (MTCNN's `rerec`)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out = boxes.copy()
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def crop_windows(
    boxes: NDArray[np.float32], width: int, height: int
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Integer pixel windows (x0, y0, x1, y1; exclusive end) of boxes clipped to the image.

    Like facenet-pytorch's `pad`, the part of a box outside the image is cut off rather than
    padded, and the remaining window is later stretched to the network's input size.
    """
    ints = np.trunc(boxes[:, :4]).astype(np.int64)
    x0 = np.maximum(ints[:, 0], 1) - 1
    y0 = np.maximum(ints[:, 1], 1) - 1
    x1 = np.minimum(ints[:, 2], width)
    y1 = np.minimum(ints[:, 3], height)
    windows = np.stack([x0, y0, x1, y1], axis=1)
    return windows, (x1 > x0) & (y1 > y0)


def _pool_bins(length: int, size: int) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    i = np.arange(size)
    return (i * length) // size, -((-(i + 1) * length) // size)


def _bin_sums(
    values: NDArray[Any], size: int, axis: int, dtype: type[np.integer[Any]]
) -> tuple[NDArray[np.int64], NDArray[np.intp]]:
    """Sums of `values` over each of the `size` adaptive-pooling bins along `axis`, and the
    bins' lengths. One pass: the bins' edges cut the axis into segments (`np.add.reduceat`, in
    `dtype`), whose running totals give every bin's sum exactly (integers)."""
    starts, ends = _pool_bins(values.shape[axis], size)
    cuts = np.unique(np.concatenate(([0], starts, ends)))
    segments = np.add.reduceat(values, cuts[:-1], axis=axis, dtype=dtype)
    first = list(segments.shape)
    first[axis] = 1
    prefix = np.concatenate(
        [np.zeros(first, np.int64), segments.cumsum(axis, dtype=np.int64)], axis=axis
    )
    at_end = np.take(prefix, np.searchsorted(cuts, ends), axis=axis)
    at_start = np.take(prefix, np.searchsorted(cuts, starts), axis=axis)
    return at_end - at_start, ends - starts


INTEGRAL_MAX_PIXELS = 1 << 20
"""Windows up to this many pixels are summed through OpenCV's integral image (int32: exact up
to 8.4 Mpx of 8-bit values; 12 bytes a pixel, so at most 12 MB here); larger ones by bins."""


def area_crop(
    image: NDArray[np.uint8], window: NDArray[np.int64], size: int
) -> NDArray[np.float32]:
    """(3, size, size) mean of each output cell's pixels, as torch's adaptive average pooling
    (cell i spans floor(i*n/size) to ceil((i+1)*n/size)).

    The cells' sums are exact integers either way. A window of up to `INTEGRAL_MAX_PIXELS`
    takes them from `cv2.integral` (a 300 x 300 face: 0.1 ms, against 2 ms by bins); a
    larger one sums its rows per bin first (uint32: a segment holds at most 255 x its rows),
    then the columns of those `size` rows, without an integral image of its own size: a face
    filling a 4 Mpx photo took 109 ms and 0.3 GB of float64 integral image and copies that
    way, 15 ms and a few MB this way."""
    x0, y0, x1, y1 = (int(v) for v in window)
    region = image[y0:y1, x0:x1]
    cells: NDArray[Any]  # exact integer sums either way
    if region.shape[0] * region.shape[1] <= INTEGRAL_MAX_PIXELS:
        top, bottom = _pool_bins(region.shape[0], size)
        left, right = _pool_bins(region.shape[1], size)
        sums = cv2.integral(region, sdepth=cv2.CV_32S)
        cells = (
            sums[np.ix_(bottom, right)]
            - sums[np.ix_(top, right)]
            - sums[np.ix_(bottom, left)]
            + sums[np.ix_(top, left)]
        )
        heights, widths = bottom - top, right - left
    else:
        rows, heights = _bin_sums(region, size, 0, np.uint32)
        cells, widths = _bin_sums(rows, size, 1, np.int64)
    area = (heights[:, None] * widths[None, :])[..., None]
    return (cells / area).astype(np.float32).transpose(2, 0, 1)


def normalised_crops(
    image: NDArray[np.uint8], windows: NDArray[np.int64], size: int
) -> NDArray[np.float32]:
    """(N,3,size,size) crops of an RGB image, area-resampled and scaled as MTCNN expects."""
    out = np.empty((len(windows), 3, size, size), np.float32)
    for k, window in enumerate(windows):
        out[k] = area_crop(image, window, size)
    return (out - 127.5) * 0.0078125


class ONetSession:
    """ONet on ONNX Runtime: crops in, offsets, landmarks and face probability out."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self._outputs = ["offsets", "landmarks", "probability"]

    def run(
        self, crops: NDArray[np.float32]
    ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
        """(offsets (N,4), landmarks (N,10), probability (N,)) for normalised crops (N,3,48,48)."""
        parts = [
            self.session.run(self._outputs, {"crops": crops[i : i + ONET_CHUNK]})
            for i in range(0, len(crops), ONET_CHUNK)
        ]
        offsets, points, probs = (
            np.concatenate([np.asarray(p[k], np.float32) for p in parts]) for k in range(3)
        )
        return offsets, points, probs


class ONetVerifier(InferenceModel[[NDArray[np.uint8], NDArray[np.float32]], NDArray[np.float32]]):
    """MTCNN's last stage as a second opinion on another detector's boxes (ONNX Runtime).

    SCRFD-500M also fires on animal faces (a golden retriever photo scored 0.66-0.76, as
    high as many real faces); ONet gives that box 0.14 while real faces on the dev sets
    score above 0.88. Costs one batched 48x48 forward for all faces of a photo.
    """

    def __init__(self, onet: ONetSession, *, model: ModelInfo) -> None:
        self.onet = onet
        self.model = model

    @classmethod
    def _load(cls, settings: PipelineSettings, files: ModelFiles) -> ONetVerifier:
        """ONet built from facenet-pytorch's checked weights, on ONNX Runtime."""
        info = files.resolve("mtcnn_onet")
        session = onnx_session(onet_onnx(settings, info), settings)
        return cls(ONetSession(session), model=info)

    def face_probability(
        self, image: NDArray[np.uint8], boxes: NDArray[np.float32]
    ) -> NDArray[np.float32]:
        """ONet's face probability (n,) for each box (n, 4) of an RGB image."""
        probs = np.zeros(len(boxes), np.float32)
        if len(boxes) == 0:
            return probs
        height, width = image.shape[:2]
        windows, valid = crop_windows(square_boxes(boxes.astype(np.float32)), width, height)
        if valid.any():
            _, _, face = self.onet.run(normalised_crops(image, windows[valid], 48))
            probs[valid] = face.reshape(-1)
        return probs

    predict = face_probability


def prebuild(settings: PipelineSettings) -> Path:
    """Build ONet's ONNX into the model cache now (an image build step), so that no worker
    pays the build (about a second, mostly importing onnx) at its first load."""
    onet_onnx(settings, resolve_model("mtcnn_onet"))
    return _cached_onnx(settings)


if __name__ == "__main__":  # python -m worker.onet
    from worker.settings import PipelineSettings

    logging.basicConfig(level=logging.INFO)
    logger.info("ONet's ONNX is at %s", prebuild(PipelineSettings()))

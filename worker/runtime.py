"""Execution providers and thread counts, chosen in one place for ONNX Runtime and torch."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import io
import json
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from worker.models import write_cache_file

if TYPE_CHECKING:
    from worker.settings import PipelineSettings
    from worker.types import ModelInfo

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_threads(settings: PipelineSettings) -> int:
    """Threads for CPU inference: the setting, or this process's share of the cores.

    A Celery worker runs `worker_concurrency` processes on the same cores (a field of the
    service's settings, which extend these): each gets cores // processes, at least one, so
    that processes x threads never exceeds the cores."""
    if settings.threads > 0:
        return settings.threads
    processes = max(1, int(getattr(settings, "worker_concurrency", 1)))
    return max(1, available_cores() // processes)


def limit_image_threads() -> None:
    """OpenCV's own pool (letterbox resize, face alignment) to one thread: its calls are
    small, and a second pool beside ONNX Runtime's and the decode threads only adds
    contention (12 g20 photos: 10.3 vs 11.5 CPU-s with it at two threads)."""
    import cv2

    cv2.setNumThreads(1)


TRIM_EVERY_PHOTOS = 4
"""`FacePipeline.analyze` hands freed heap memory back every this many photos."""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        return None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`; elsewhere nothing).

    Decoded photos, resized copies and detector outputs are large, short-lived and of every
    size; glibc keeps what they free inside its heaps, where the next photo's pieces rarely
    fit, so resident memory creeps up over an album. Trimming every `TRIM_EVERY_PHOTOS`
    photos kept g20 + celeba + g20 + celeba + g20 in one process at 534 instead of 615 MB
    peak, in the same time (after every photo: 533 MB, 8 % slower; docs/throughput.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ScratchArrays:
    """Arrays reused from call to call, one set per thread: a model's input, rebuilt for every
    photo, is written into the same memory each time instead of into fresh arrays of a few MB
    (SCRFD's input for a 500 x 416 photo: 0.4 ms into reused arrays, 2.5 ms as fresh arrays
    through a transposed view, on the 2-core bench machine). An array handed out is valid
    until the same thread asks for the same `name` again."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...], dtype: type[np.generic]) -> NDArray[Any]:
        """A C-contiguous array of `shape` and `dtype` (contents undefined)."""
        buffers: dict[str, NDArray[Any]] = self._local.__dict__.setdefault("buffers", {})
        size = math.prod(shape)
        buffer = buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.size < size:
            buffer = buffers[name] = np.empty(size, dtype)
        return buffer[:size].reshape(shape)


def decode_threads(settings: PipelineSettings) -> int:
    """Threads reading and decoding photos ahead: the setting, or 2 (one reads, possibly
    from S3, while the other decodes); they overlap with inference rather than compete,
    since ONNX Runtime's idle threads sleep instead of spinning (`onnx_session`)."""
    return settings.decode_workers if settings.decode_workers > 0 else 2


ALLOW_SPINNING = "0"
"""ONNX Runtime's intra-op threads sleep when idle ('1' would let them spin; see `onnx_session`)."""


CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}
"""The CUDA provider's default (EXHAUSTIVE) benchmarks every convolution again for each new
input shape, and shapes vary here (SCRFD's input follows each photo's aspect ratio, embedding
batches their face count): measured on an H200, it made SCRFD 5x and ArcFace 10x slower than
the same machine's CPU. cuDNN's heuristic picks an algorithm without benchmarking."""


def check_one_runtime() -> None:
    """Refuse an install holding both `onnxruntime` and `onnxruntime-gpu`: they share one
    module, so which one loads depends on the install order."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    if len(found) > 1:
        raise RuntimeError(
            f"both {' and '.join(found)} are installed and share the `onnxruntime` module: "
            "`pip uninstall -y onnxruntime onnxruntime-gpu`, then install the project with "
            "exactly one of the extras `.[cpu]` or `.[gpu]`"
        )


def onnx_providers(settings: PipelineSettings) -> list[str | tuple[str, dict[str, str]]]:
    """ONNX Runtime providers: CUDA first when asked for or available, then CPU."""
    check_one_runtime()
    available = ort.get_available_providers()
    if settings.device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", dict(CUDA_OPTIONS)), "CPUExecutionProvider"]
    if settings.device == "cuda":
        raise RuntimeError(
            "AFTERTRIP_DEVICE=cuda, but this onnxruntime has no CUDA provider: "
            "install the `gpu` extra (onnxruntime-gpu) or set AFTERTRIP_DEVICE=auto"
        )
    return ["CPUExecutionProvider"]


_SHARED_ARENA_PID: int | None = None
"""The process that registered the shared CPU arena (a forked child registers its own)."""


def _shared_cpu_arena() -> None:
    """Register one CPU memory arena for every session of this process (once per process).

    By default each session grows an arena of its own and keeps it at its high-water mark:
    SCRFD's at the largest photo shape, the embedder's at the largest batch. The models run
    one after another, so one arena shared by all of them holds the largest need of any one,
    not the sum (docs/throughput.md, Memory)."""
    global _SHARED_ARENA_PID
    if _SHARED_ARENA_PID == os.getpid():
        return
    memory = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    try:
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
    except Exception as exc:  # already registered in this ORT environment (e.g. before a fork)
        logger.debug("shared CPU arena not registered again: %s", exc)
    _SHARED_ARENA_PID = os.getpid()


def onnx_session(model: str | bytes, settings: PipelineSettings) -> ort.InferenceSession:
    """An inference session for one model (a file, or ONNX bytes) with the project's
    providers and threads.

    On CPU, every session shares one memory arena, and ONNX Runtime's memory patterns are
    off: a pattern is planned and kept per input shape, and a photo album brings a new SCRFD
    shape with most aspect ratios and a new embedder batch with most face counts. Together,
    with the embedder's batch at 8: peak RSS on the 44 g20 photos 718 -> 576-589 MB, in the
    same time (docs/throughput.md)."""
    providers = onnx_providers(settings)
    options = ort.SessionOptions()
    if providers == ["CPUExecutionProvider"]:
        _shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.enable_mem_pattern = False
    options.intra_op_num_threads = cpu_threads(settings)
    options.inter_op_num_threads = 1
    # Spinning threads would hold every core between the small operators of these models and
    # starve the decode threads running beside them (measured in bench/RESULTS.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", ALLOW_SPINNING)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the models declare batch 1 outputs; ORT warns on every call
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    what = model if isinstance(model, str) else f"{len(model)} bytes of ONNX"
    logger.info("loaded %s on %s", what, session.get_providers()[0])
    return session


def torch_device(settings: PipelineSettings) -> str:
    """The torch device for torch models (MTCNN)."""
    import torch

    torch.set_num_threads(cpu_threads(settings))
    if settings.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if settings.device == "cuda":
        raise RuntimeError("AFTERTRIP_DEVICE=cuda, but torch sees no CUDA device")
    return "cpu"


OPENVINO_PROVIDER = "OpenVINO CPU"
"""What `OpenVINOSession.get_providers` names (it is not an ONNX Runtime provider)."""


class OpenVINOUnavailable(RuntimeError):
    """AFTERTRIP_EMBED_RUNTIME=openvino, but the `openvino` package is not installed."""


@dataclass(frozen=True)
class _Port:
    name: str
    shape: list[int | None]


class OpenVINOSession:
    """An ONNX model on OpenVINO's CPU plugin, behind the part of ONNX Runtime's
    `InferenceSession` the embedder uses (`get_inputs`, `get_outputs`, `get_providers`, `run`).

    Float32 inference (`INFERENCE_PRECISION_HINT`): on CPUs with bfloat16 units the plugin
    would otherwise compute in bfloat16 and move the embeddings (cosine 0.9986 to the float32
    ones on the bench machine). One infer request, used by the thread that runs the pipeline;
    the batch dimension stays dynamic, as the model declares it."""

    def __init__(self, model: str, threads: int, cache: _CompiledModelCache | None = None) -> None:
        try:
            import openvino
        except ImportError as exc:
            raise OpenVINOUnavailable(
                "AFTERTRIP_EMBED_RUNTIME=openvino, but the openvino package is not installed: "
                "install the `cpu` extra, or set AFTERTRIP_EMBED_RUNTIME=onnxruntime"
            ) from exc
        core = openvino.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        if cache is None:
            self._compiled = core.compile_model(core.read_model(model), "CPU", config)
        else:
            self._compiled = cache.load(core, model, config)
        self._request = self._compiled.create_infer_request()
        self._inputs = [self._port(p) for p in self._compiled.inputs]
        self._outputs = [self._port(p) for p in self._compiled.outputs]
        logger.info("loaded %s on %s (%d threads)", model, OPENVINO_PROVIDER, threads)

    @staticmethod
    def _port(port: Any) -> _Port:
        shape = port.get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        return _Port(port.get_any_name(), dims)

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [OPENVINO_PROVIDER]

    def run(self, output_names: list[str] | None, feed: dict[str, Any]) -> list[Any]:
        results = self._request.infer(feed)
        names = output_names or [p.name for p in self._outputs]
        by_name = {port.get_any_name(): value for port, value in results.items()}
        # The request reuses its output buffers: copy before the next call.
        return [np.array(by_name[name], copy=True) for name in names]


class _CompiledModelCache:
    """OpenVINO's compiled models kept on disk, each with its sha256 checked before use.

    Compiling the embedder takes OpenVINO about 0.2 s at every process start, importing the
    compiled model 0.05 s. OpenVINO's own cache (`CACHE_DIR`) imports whatever its file holds:
    a blob with 100 KB of its weights overwritten loaded without a word and gave NaN
    embeddings. Here a blob is used only if its bytes still hash to the sha256 written beside
    it when it was exported; otherwise the model is compiled again and the entry rewritten.
    Entries are named by the model file's sha256, OpenVINO's version, the compile settings
    and the CPU's instruction sets."""

    def __init__(self, folder: Path, model_sha256: str) -> None:
        self.folder = folder
        self.model_sha256 = model_sha256  # checked when the model file was resolved

    def _entry(self, model: str, config: dict[str, Any]) -> Path:
        import openvino

        key = json.dumps(
            [self.model_sha256, openvino.__version__, sorted(config.items()), _cpu_flags()]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.folder / f"{Path(model).stem}.{digest}.blob"

    def load(self, core: Any, model: str, config: dict[str, Any]) -> Any:
        """The compiled model: imported from a checked entry, or compiled (and kept)."""
        blob = self._entry(model, config)
        checksum = blob.with_suffix(".sha256")
        try:
            data = blob.read_bytes()
            if hashlib.sha256(data).hexdigest() == checksum.read_text().strip():
                return core.import_model(data, "CPU", config)
            logger.warning("%s does not match its sha256: compiling the model again", blob)
        except FileNotFoundError:
            pass
        except Exception as exc:  # unreadable, or refused by this OpenVINO: compile instead
            logger.warning("cannot use %s (%s): compiling the model again", blob, exc)
        compiled = core.compile_model(core.read_model(model), "CPU", config)
        try:
            stream = io.BytesIO()
            compiled.export_model(stream)
            data = stream.getvalue()
            write_cache_file(blob, data)
            write_cache_file(checksum, hashlib.sha256(data).hexdigest().encode())
        except Exception as exc:  # a read-only cache (or a failed export) costs a compile
            logger.warning("cannot keep the compiled model in %s: %s", self.folder, exc)
        return compiled


@functools.cache
def _cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux), or its platform name elsewhere."""
    import platform

    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def embed_runtime(settings: PipelineSettings) -> str:
    """`openvino` or `onnxruntime`: what runs the embedder for these settings.

    OpenVINO only runs on the CPU here; with a CUDA provider in use the embedder stays on ONNX
    Runtime's."""
    if settings.embed_runtime != "auto":
        return settings.embed_runtime
    on_cpu = onnx_providers(settings)[0] == "CPUExecutionProvider"
    return "openvino" if on_cpu and openvino_installed() else "onnxruntime"


def embedder_session(
    model: ModelInfo, settings: PipelineSettings
) -> ort.InferenceSession | OpenVINOSession:
    """The embedder's session: OpenVINO's CPU plugin or ONNX Runtime (`embed_runtime`).

    OpenVINO's compiled model is kept, checked, under AFTERTRIP_MODEL_CACHE_DIR/openvino."""
    if embed_runtime(settings) == "openvino":
        cache = _CompiledModelCache(settings.model_cache_dir / "openvino", model.sha256)
        return OpenVINOSession(model.path, cpu_threads(settings), cache)
    return onnx_session(model.path, settings)

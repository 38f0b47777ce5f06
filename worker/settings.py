"""The pipeline's one settings object, read from `AFTERTRIP_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DetectorName = Literal["mtcnn", "scrfd"]
Device = Literal["auto", "cpu", "cuda"]
EmbedRuntime = Literal["auto", "onnxruntime", "openvino"]


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "aftertrip-faces"


class PipelineSettings(BaseSettings):
    """How photos are decoded, faces found, embedded and grouped.

    Every field can be set from the environment as `AFTERTRIP_<FIELD>` (upper case).
    """

    model_config = SettingsConfigDict(env_prefix="AFTERTRIP_", extra="ignore", frozen=True)

    # decoding
    max_image_pixels: int = Field(
        150_000_000, description="Refuse images with more pixels than this (decompression bombs)."
    )
    max_decoded_bytes: int = Field(
        600_000_000,
        description="Refuse a photo whose decoded pixels would take more bytes than this, "
        "whatever its format and bit depth; a worker process's decodes share it, which bounds "
        "its decode memory (docs/reliability.md). 0 = no limit.",
    )
    working_pixels: int = Field(
        4_200_000,
        description="Decode and detect at about this many pixels; larger photos are scaled down.",
    )

    # detection
    detector: DetectorName = Field(
        "scrfd", description="Face detector: scrfd (default; see bench/RESULTS.md) or mtcnn."
    )
    min_face_size: int = Field(20, description="Smallest face to find, in working-image pixels.")
    detection_threshold: float | None = Field(
        None, description="Minimum detector score; empty = the detector's own default."
    )
    verify_threshold: float = Field(
        0.5,
        description="SCRFD faces must also score this on MTCNN's ONet (rejects animal faces); "
        "0 = off.",
    )
    scrfd_input_size: int = Field(
        800, description="SCRFD's input size: the photo is fitted into this square."
    )
    closer_look_min_face: int = Field(
        24,
        ge=0,
        description="SCRFD only: on photos too big for the first pass to see a face this wide "
        "(in the photo's own pixels; over about 3 Mpx), look again at the scale that does and "
        "keep the faces ONet confirms: friends 10-15 m away in 12-MP group shots. Portraits and "
        "selfies are not looked at again. 0 = off (docs/pipeline.md).",
    )
    retry_margin: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="When no face is found, look again at the photo framed by a border of this "
        "share of its longer side (faces that fill or are cut by the frame); 0 = off.",
    )
    retry_rotated: bool = Field(
        True,
        description="When still no face is found, look again at the photo turned a quarter "
        "each way (faces lying on their side).",
    )

    # models
    embedder: str = Field("w600k_mbf", description="Registry name of the ArcFace model.")
    embedder_path: str | None = Field(
        None, description="Use this ArcFace ONNX file instead (local path or s3:// URI)."
    )
    embedder_sha256: str | None = Field(
        None, description="Expected sha256 of AFTERTRIP_EMBEDDER_PATH (checked at load)."
    )
    scrfd_path: str | None = Field(
        None, description="Use this SCRFD ONNX file instead (local path or s3:// URI)."
    )
    scrfd_sha256: str | None = Field(None, description="Expected sha256 of AFTERTRIP_SCRFD_PATH.")
    model_cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where models given as s3:// URIs are downloaded and verified once, and "
        "where ONet's graph and OpenVINO's compiled embedder are kept (each checked by sha256 "
        "before use; a read-only folder costs a rebuild per process).",
    )

    @field_validator("model_cache_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        """A `~` in the variable is the user's home, for every cache kept under it."""
        return value.expanduser()

    # execution
    device: Device = Field("auto", description="auto (CUDA when available), cpu or cuda.")
    embed_runtime: EmbedRuntime = Field(
        "auto",
        description="Runtime of the embedder on CPU: auto (OpenVINO when installed, as the cpu "
        "extra does, else ONNX Runtime), openvino or onnxruntime. OpenVINO's CPU plugin, at "
        "float32, gives the same vectors (within 1e-4) and embeds faster, for more peak RSS "
        "(docs/throughput.md); on a GPU the embedder runs on ONNX Runtime's CUDA provider.",
    )
    threads: int = Field(
        0,
        ge=0,
        description="Inference threads per worker process (ONNX Runtime, and torch for MTCNN); "
        "0 = the cores this process may use (CPU affinity) divided by "
        "AFTERTRIP_WORKER_CONCURRENCY, so processes x threads <= cores. Idle threads sleep, "
        "so decoding overlaps with inference.",
    )
    embed_batch_size: int = Field(
        8,
        description="Face chips per embedder call. 8 on CPU: a lower peak RSS than 16 in the same "
        "time (docs/throughput.md, Memory); GPU workers take 64 (docker/Dockerfile.gpu), where a "
        "full batch costs hardly more than one chip.",
    )
    decode_workers: int = Field(
        0,
        ge=0,
        description="Threads reading and decoding photos ahead, beside inference; 0 = 2 (one "
        "reads, e.g. from S3, while the other decodes).",
    )
    prefetch: int = Field(4, description="Photos decoded ahead of detection (bounds memory).")

    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text with the structured fields as key=value, or one JSON "
        "object per line (log collectors).",
    )

    # grouping
    grouping: str = Field("default", description="Grouping method: default or seed.")
    small_face: int = Field(
        40,
        ge=0,
        description="A face smaller than this (the longer side of its box) in the pixels its "
        "chip was cut from is small: two small faces never found a person together, and one "
        "under 0.6 of this alone joins a person only above the grouping's cut, not the lower "
        "attach bar; blurred faces look alike whoever they are (docs/pipeline.md). 0 = off.",
    )
    near_duplicates: bool = Field(
        True,
        description="A small face left in others follows the folder of the large face at its "
        "place in a near-duplicate shot (the same faces standing the same way, up to scale and "
        "shift), when its own embedding is closest to that folder (docs/pipeline.md). "
        "false = off.",
    )
    similarity_threshold: float | None = Field(
        None, description="Cosine threshold; empty = the value calibrated for the embedder."
    )

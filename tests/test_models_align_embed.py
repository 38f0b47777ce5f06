"""Model registry checks, alignment geometry and the ArcFace embedder on real weights."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.align import ARCFACE_TEMPLATE, align_faces, estimate_norm, norm_crop, umeyama
from worker.embed import ArcFaceEmbedder
from worker.errors import ModelChecksumMismatch, ModelNotFound
from worker.models import REGISTRY, copy_model, resolve_model, sha256_of
from worker.settings import PipelineSettings


def test_every_registered_model_is_installed_and_verified() -> None:
    for name, spec in REGISTRY.items():
        info = resolve_model(name)
        assert info.sha256 == spec.sha256
        assert Path(info.path).is_file()


def test_override_with_a_wrong_sha256_says_what_to_do(tmp_path: Path) -> None:
    model = tmp_path / "arcface.onnx"
    model.write_bytes(b"not really a model")
    with pytest.raises(ModelChecksumMismatch, match="failed its sha256 check.*replace"):
        resolve_model("w600k_mbf", override=str(model), override_sha256="0" * 64)
    info = resolve_model("w600k_mbf", override=str(model), override_sha256=sha256_of(model))
    assert info.path == str(model) and info.name == "arcface"


def test_missing_and_unknown_models_are_specific_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model("w600k_mbf", override=str(tmp_path / "nope.onnx"))
    with pytest.raises(ModelNotFound, match="unknown model 'r100'.*w600k_mbf"):
        resolve_model("r100")
    with pytest.raises(ModelNotFound, match="no downloader"):
        resolve_model("w600k_mbf", override="s3://bucket/models/r50.onnx", cache_dir=tmp_path)


def test_remote_model_is_downloaded_once_into_the_cache_and_verified(tmp_path: Path) -> None:
    packaged = Path(resolve_model("w600k_mbf").path)
    calls: list[str] = []

    def fetch(uri: str, dest: Path) -> None:
        calls.append(uri)
        copy_model(f"file://{packaged}", dest)

    uri = "s3://models/arcface/w600k_mbf.onnx"
    sha = REGISTRY["w600k_mbf"].sha256
    for _ in range(2):
        info = resolve_model(
            "w600k_mbf", override=uri, override_sha256=sha, cache_dir=tmp_path, fetch=fetch
        )
        assert info.sha256 == sha and Path(info.path).is_relative_to(tmp_path)
    assert calls == [uri]


def test_umeyama_recovers_a_similarity_transform() -> None:
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE
    dst = scale * src @ rot.T + shift
    matrix = umeyama(src, dst)
    np.testing.assert_allclose(matrix[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)


def test_landmarks_on_the_template_give_an_identity_crop() -> None:
    image = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    np.testing.assert_allclose(estimate_norm(ARCFACE_TEMPLATE)[:, :2], np.eye(2), atol=1e-9)
    np.testing.assert_array_equal(norm_crop(image, ARCFACE_TEMPLATE), image)
    assert align_faces(image, np.stack([ARCFACE_TEMPLATE] * 3)).shape == (3, 112, 112, 3)


@pytest.fixture(scope="module")
def embedder() -> ArcFaceEmbedder:
    return ArcFaceEmbedder.load(PipelineSettings(embed_batch_size=3))


def test_embeddings_are_unit_length_and_batch_independent(
    embedder: ArcFaceEmbedder, yaoming_jpg: bytes
) -> None:
    face = np.asarray(Image.open(io.BytesIO(yaoming_jpg)).convert("RGB").resize((112, 112)))
    rng = np.random.default_rng(1)
    chips = np.stack([face] + [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)] * 6)
    batched = embedder.embed(chips)
    single = np.concatenate([embedder.embed(chips[i : i + 1]) for i in range(len(chips))])
    assert batched.shape == (7, 512) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    # On an H200 (CUDA, TF32 convolutions) batch shapes change the last digits: up to 3e-4.
    np.testing.assert_allclose(batched, single, atol=1e-3)
    assert embedder.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 512)
    # Padding every batch to the full size (what a GPU session does) changes nothing.
    padded = ArcFaceEmbedder(
        embedder.session, embedder.model, embedder.batch_size, fixed_batch=True
    )
    np.testing.assert_allclose(padded.embed(chips), batched, atol=1e-5)
    np.testing.assert_allclose(padded.embed(chips[:1]), single[:1], atol=1e-5)


def test_same_face_is_closer_than_a_different_face(
    embedder: ArcFaceEmbedder, yaoming_jpg: bytes, gdp_jpg: bytes
) -> None:
    from worker.zoo import load_detector

    detector = load_detector(PipelineSettings(detector="scrfd"))
    yao = np.asarray(Image.open(io.BytesIO(yaoming_jpg)).convert("RGB"))
    gdp = np.asarray(Image.open(io.BytesIO(gdp_jpg)).convert("RGB"))
    yao_faces, gdp_faces = detector.detect(yao), detector.detect(gdp)
    yao_chip = align_faces(yao, yao_faces.landmarks[:1])
    mirrored = yao_chip[:, :, ::-1].copy()
    others = align_faces(gdp, gdp_faces.landmarks[:3])
    vectors = embedder.embed(np.concatenate([yao_chip, mirrored, others]))
    same = float(vectors[0] @ vectors[1])
    different = vectors[2:] @ vectors[0]
    assert same > 0.6
    assert different.max() < 0.3


# --- the embedder's runtime on CPU: OpenVINO (the cpu extra) or ONNX Runtime ---------------


def _real_chips(players_jpg: bytes) -> np.ndarray:
    from worker.zoo import load_detector

    detector = load_detector(PipelineSettings(detector="scrfd"))
    image = np.asarray(Image.open(io.BytesIO(players_jpg)).convert("RGB"))
    found = detector.detect(image)
    assert len(found) >= 5
    return align_faces(image, found.landmarks)


def test_openvino_embedder_gives_onnx_runtimes_vectors(players_jpg: bytes) -> None:
    """The cpu extra's default (OpenVINO, float32) and ONNX Runtime embed the same real faces
    to the same vectors, in batches of every size the pipeline sends."""
    pytest.importorskip("openvino", reason="the cpu extra installs openvino")
    from worker import runtime

    chips = _real_chips(players_jpg)
    ov = ArcFaceEmbedder.load(PipelineSettings(device="cpu", embed_runtime="openvino"))
    ort = ArcFaceEmbedder.load(PipelineSettings(device="cpu", embed_runtime="onnxruntime"))
    assert ov.session.get_providers() == [runtime.OPENVINO_PROVIDER]
    assert ort.session.get_providers() == ["CPUExecutionProvider"]
    assert (ov.chip_size, ov.dim) == (ort.chip_size, ort.dim) == (112, 512)
    expected = ort.embed(chips)
    for batch in (1, 3, 8):
        ov.batch_size = batch
        np.testing.assert_allclose(ov.embed(chips), expected, atol=1e-4)
    # Distinct faces stay distinct: the comparison is not between constant vectors.
    assert (expected @ expected.T)[np.triu_indices(len(chips), 1)].max() < 0.9


def test_openvino_compiled_model_is_kept_and_checked_before_use(
    players_jpg: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The compiled embedder is kept under the model cache and imported by the next process;
    a kept blob whose bytes changed (OpenVINO's own cache would load it and embed NaN) is
    compiled again, and a cache that cannot be written only costs the compile."""
    pytest.importorskip("openvino", reason="the cpu extra installs openvino")
    chips = _real_chips(players_jpg)
    settings = PipelineSettings(device="cpu", embed_runtime="openvino", model_cache_dir=tmp_path)
    expected = ArcFaceEmbedder.load(settings).embed(chips)
    (blob,) = (tmp_path / "openvino").glob("w600k_mbf.*.blob")
    assert blob.with_suffix(".sha256").is_file()
    written = blob.stat().st_mtime_ns

    np.testing.assert_allclose(ArcFaceEmbedder.load(settings).embed(chips), expected, atol=1e-6)
    assert blob.stat().st_mtime_ns == written  # imported, not compiled and written again

    data = bytearray(blob.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 100_000] = bytes(range(256)) * 390 + bytes(160)
    blob.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="worker.runtime"):
        again = ArcFaceEmbedder.load(settings).embed(chips)
    assert "does not match its sha256" in caplog.text
    np.testing.assert_allclose(again, expected, atol=1e-6)
    assert blob.read_bytes() != bytes(data)  # the entry was written again

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    caplog.clear()
    with caplog.at_level("WARNING", logger="worker.runtime"):
        unkept = ArcFaceEmbedder.load(settings.model_copy(update={"model_cache_dir": not_a_folder}))
    assert "cannot keep the compiled model" in caplog.text
    np.testing.assert_allclose(unkept.embed(chips), expected, atol=1e-6)


def test_model_cache_dir_with_a_tilde_is_the_users_home_for_every_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AFTERTRIP_MODEL_CACHE_DIR=~/models (quoted, so no shell expanded it) is one folder in
    the home for downloads, ONet's graph and the compiled embedder, not a folder named `~`."""
    pytest.importorskip("openvino", reason="the cpu extra installs openvino")
    from worker import onet

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AFTERTRIP_MODEL_CACHE_DIR", "~/models")
    settings = PipelineSettings(device="cpu", embed_runtime="openvino")
    assert settings.model_cache_dir == tmp_path / "models"
    assert onet._cached_onnx(settings).parent == tmp_path / "models"
    ArcFaceEmbedder.load(settings)
    assert list((tmp_path / "models" / "openvino").glob("w600k_mbf.*.blob"))


def test_embed_runtime_auto_picks_openvino_on_cpu_when_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import runtime

    cpu = PipelineSettings(device="cpu")
    monkeypatch.setattr(runtime, "openvino_installed", lambda: True)
    assert runtime.embed_runtime(cpu) == "openvino"
    assert runtime.embed_runtime(PipelineSettings(device="cpu", embed_runtime="onnxruntime")) == (
        "onnxruntime"
    )
    monkeypatch.setattr(runtime, "openvino_installed", lambda: False)
    assert runtime.embed_runtime(cpu) == "onnxruntime"
    # A CUDA provider in use keeps the embedder on ONNX Runtime (OpenVINO runs on CPU here).
    monkeypatch.setattr(runtime, "openvino_installed", lambda: True)
    monkeypatch.setattr(
        runtime, "onnx_providers", lambda s: [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    )
    assert runtime.embed_runtime(PipelineSettings(device="auto")) == "onnxruntime"


def test_openvino_asked_for_but_missing_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from worker import runtime

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(runtime.OpenVINOUnavailable, match="AFTERTRIP_EMBED_RUNTIME=onnxruntime"):
        ArcFaceEmbedder.load(PipelineSettings(device="cpu", embed_runtime="openvino"))

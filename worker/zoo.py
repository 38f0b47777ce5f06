"""The model zoo: the one place that builds, from the settings, every model the pipeline runs.

Each model class has the same lifecycle (`worker.models.InferenceModel`: `load(settings,
fetch=...)`, `predict`); this module picks the classes and composes them: SCRFD confirmed by
ONet's verifier, or MTCNN, each with its second looks, and the ArcFace embedder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.detect import FaceDetector, SecondLook, VerifiedDetector
from worker.embed import ArcFaceEmbedder
from worker.onet import ONetVerifier
from worker.scrfd import SCRFDDetector

if TYPE_CHECKING:
    from worker.models import RemoteFetcher
    from worker.settings import PipelineSettings


def load_detector(
    settings: PipelineSettings, *, fetch: RemoteFetcher | None = None
) -> FaceDetector:
    """The detector the settings name, with its weights resolved and verified.

    The SCRFD path (the default) runs on ONNX Runtime alone; only MTCNN imports torch."""
    if settings.detector == "scrfd":
        plain = SCRFDDetector.load(settings, fetch=fetch)
        scrfd: FaceDetector = plain
        verifier = load_verifier(settings, fetch=fetch) if settings.verify_threshold > 0 else None
        if verifier is not None:
            scrfd = VerifiedDetector(scrfd, verifier, settings.verify_threshold)
        coarse = SecondLook(scrfd, margin=settings.retry_margin, rotated=settings.retry_rotated)
        if settings.closer_look_min_face <= 0:
            return coarse
        from worker.closer import CloserLook, fine_detector

        # Faces a few metres away in big photos: a closer look where the coarse pass is blind.
        return CloserLook(
            coarse,
            fine_detector(plain),
            verifier,
            threshold=settings.verify_threshold,
            min_face=settings.closer_look_min_face,
            coarse_input=settings.scrfd_input_size,
            score_threshold=plain.threshold,
        )
    from worker.mtcnn import MTCNNDetector

    # MTCNN's own last stage is ONet: verifying its faces again would add nothing.
    return SecondLook(
        MTCNNDetector.load(settings, fetch=fetch),
        margin=settings.retry_margin,
        rotated=settings.retry_rotated,
        close_ups=True,
    )


def load_verifier(
    settings: PipelineSettings, *, fetch: RemoteFetcher | None = None
) -> ONetVerifier:
    """ONet, the second opinion on SCRFD's faces (its graph built once into the model cache)."""
    return ONetVerifier.load(settings, fetch=fetch)


def load_embedder(
    settings: PipelineSettings, *, fetch: RemoteFetcher | None = None
) -> ArcFaceEmbedder:
    """The embedder the settings name, on the runtime they choose (OpenVINO or ONNX Runtime)."""
    return ArcFaceEmbedder.load(settings, fetch=fetch)

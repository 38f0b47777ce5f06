"""Specific exceptions of the pipeline core; each names the photo or model it is about."""

from __future__ import annotations

from worker.types import PhotoStatus


class AfterTripError(Exception):
    """Base class of every error this project raises on purpose."""


class PhotoError(AfterTripError):
    """A photo cannot be processed; `status` is what its result entry records."""

    status: PhotoStatus = PhotoStatus.ERROR

    def __init__(self, photo: str, reason: str) -> None:
        super().__init__(f"{photo}: {reason}")
        self.photo = photo
        self.reason = reason


class CorruptImage(PhotoError):
    """The bytes claim a known format but cannot be decoded (truncated, damaged, empty)."""

    status = PhotoStatus.CORRUPT


class UnsupportedImage(PhotoError):
    """The bytes are not an image in any format the decoder knows."""

    status = PhotoStatus.UNSUPPORTED


class ImageTooLarge(PhotoError):
    """The image has more pixels than the decompression-bomb cap allows."""

    status = PhotoStatus.TOO_LARGE


class ImageTooSmall(PhotoError):
    """The image is smaller than the smallest face the detector can find."""

    status = PhotoStatus.TOO_SMALL


class PhotoUnreadable(PhotoError):
    """The photo's bytes could not be read from storage (missing object, permission)."""

    status = PhotoStatus.MISSING


class ModelError(AfterTripError):
    """A model file is missing, corrupt or unusable; the message says what to do."""


class ModelNotFound(ModelError):
    """No file for a model where the registry or a setting points."""


class ModelChecksumMismatch(ModelError):
    """A model file's sha256 differs from the one the registry or a setting expects."""

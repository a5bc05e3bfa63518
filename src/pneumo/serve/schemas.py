"""The API's contract: what each route answers, errors included, as the OpenAPI schema declares it.

Every error, whoever raises it (a route, a limit, request validation), has one body: ``{"detail":
"a sentence naming the file and the problem"}``. The response models allow extra fields, so a
field added to a route's answer reaches clients before it is declared here; declare it anyway.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ACCEPTED_MEDIA = ("image/jpeg", "image/png", "application/dicom")


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong, naming the upload where there is one")


class ImageInfo(BaseModel):
    width: int
    height: int
    mode: str = Field(description="PIL mode of the decoded upload: L, RGB, I;16 ...")


class Reading(BaseModel):
    """One X-ray read by the model.

    One meaning of probability, as everywhere in pneumo: ``p_positive`` is p(positive_class), the
    one the threshold is compared with. No field gives p(label): beside ``"label": "NORMAL"`` it read
    as the chance of pneumonia. ``probabilities`` gives every class's, each under its class's name.
    """

    model_config = ConfigDict(extra="allow")

    filename: str
    label: str | None = Field(description="the decided class; null when the film is out of scope (in_scope false)")
    probabilities: dict[str, float] = Field(
        description="p(class) for every class, keyed by class name (calibrated; they add up to 1)"
    )
    threshold: float | None = Field(description="on p(positive_class); null when the highest probability wins")
    positive_class: str | None
    p_positive: float | None = Field(
        None,
        ge=0,
        le=1,
        description="p(positive_class), whatever the label: the probability the threshold is compared with",
    )
    reading: str | None = Field(None, description="the decision in words: p(positive) against the threshold")
    in_scope: bool | None = Field(None, description="false: the film is not what the model was made for, no label")
    scope_reason: str | None = Field(
        None, description="why the film is out of scope, or what the check could not use (empty: nothing to say)"
    )
    scope_distance: float | None = Field(
        None, description="feature distance over its out-of-scope threshold (>1: out); null when not measured"
    )
    image: ImageInfo
    heatmap_png_base64: str | None = Field(description="Grad-CAM over the image, a base64 PNG; null if not asked")
    heatmap_class: str | None
    elapsed_ms: float
    reading_id: str | None = Field(None, description="the audit trail's id, for /api/feedback; null with --no-audit")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    arch: str
    classes: list[str]
    image_size: int
    threshold: float | None
    positive_class: str | None
    threshold_method: str | None
    temperature: float | None
    max_upload_mb: float
    max_image_pixels: int
    accepted: list[str]
    pneumo_version: str | None
    trained_on: dict | None = Field(
        None, description="what the model was trained on (data folder name, counts, sentence)"
    )


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str
    arch: str
    workers: int
    active: int = Field(description="requests running or waiting for an inference thread")
    waiting: int
    queue_limit: int
    pixels_in_use: int = Field(description="decoded pixels held by readings now")
    pixel_budget: int


def errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, each with :class:`ErrorBody` and a description."""
    out: dict[int | str, dict[str, Any]] = {}
    for status, text in described.items():
        out[status] = {"model": ErrorBody, "description": text}
        if status == 503:
            out[status]["headers"] = {
                "Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}
            }
    return out


UPLOAD_ERRORS = errors(
    {
        400: "the multipart body cannot be parsed",
        408: "the body did not arrive within the server's body timeout",
        413: "the upload is larger than the byte limit, or its header claims more pixels than the pixel limit",
        415: "not a JPEG, PNG or DICOM file (by content type or by its first bytes)",
        422: "no file, an empty file, a bad query parameter, or an image that cannot be decoded",
        503: "the server is busy (inference queue or pixel budget full) or the audit trail cannot record "
        "the reading; retry after Retry-After seconds",
    }
)
AUTH_ERRORS = errors({401: "this server needs 'Authorization: Bearer TOKEN' (it was started with a token)"})
# The upload's part: non-empty, and a JPEG, PNG or DICOM file (the first bytes decide; the content type may be generic).
UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "content": {"multipart/form-data": {"encoding": {"file": {"contentType": ", ".join(ACCEPTED_MEDIA)}}}}
    }
}

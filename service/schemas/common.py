"""What every API body shares: the string constraints of names and free text, the strict request
base, and the error body every error response carries (`error_responses`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Names and free text that reach the file system or the database: no NUL (PostgreSQL text cannot
# hold it, paths cannot contain it); lone surrogates are refused by pydantic's str itself.
NoNul = r"^[^\x00]*$"


Name = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=NoNul)]
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NoNul)]
MetaValue = Annotated[str, StringConstraints(max_length=512, pattern=NoNul)]
Text = Annotated[str, StringConstraints(pattern=NoNul)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ErrorInfo(BaseModel):
    code: str = Field(description="Machine-readable code, e.g. invalid_value, not_found, unauthorized.")
    message: str = Field(description="What went wrong, for people.")
    field: str | None = Field(
        description="The request part at fault: a dotted path into the body or query "
        "(`hyperparameters.learning_rate`, `prompt[1].content`), a header name "
        "(`Idempotency-Key`), or null."
    )
    details: list[dict[str, Any]] = Field(
        description="Every problem found (e.g. each invalid field, or each bad row of an upload)."
    )


class ErrorBody(BaseModel):
    error: ErrorInfo


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entry declaring the error body for each status code."""
    words = {
        401: "Missing or invalid API key.",
        404: "No such object (or it belongs to another key).",
        408: "The upload's body stalled (nothing for TVKD_UPLOAD_IDLE_SECONDS).",
        409: "The request conflicts with the object's state.",
        413: "The body is larger than a limit (TVKD_MAX_UPLOAD_BYTES, TVKD_MAX_JSON_BODY_BYTES, "
        "TVKD_UPLOAD_MAX_* after decompression); the message names it.",
        422: "Invalid request; `error.field` names the field.",
        503: "Unavailable for now (the database cannot be reached): retry after `Retry-After` seconds.",
    }
    return {code: {"model": ErrorBody, "description": words.get(code, "Error.")} for code in codes}

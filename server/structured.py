"""Structured outputs as requests ask for them: OpenAI's `response_format` (chat, completions) and
`text.format` (responses), vLLM's `structured_outputs` and its older `guided_*` fields, all to
the one engine Constraint. Asking for two at once is a 400."""

from __future__ import annotations

import json

from engine.params import Constraint

from . import errors


def constraint_of(body) -> Constraint | None:
    """The request's constraint, from whichever field names it."""
    found = [c for c in (from_response_format(body.response_format), from_structured(body.structured_outputs),
                         from_guided(body)) if c is not None]
    if len(found) > 1:
        raise errors.APIError(400, "give one of response_format, structured_outputs and guided_*, not several",
                              param="response_format", code="invalid_value")
    return found[0] if found else None


def from_response_format(rf) -> Constraint | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return Constraint("json_object")
    if rf.json_schema is None or not rf.json_schema.schema_:
        raise errors.APIError(400, "response_format json_schema needs json_schema.schema",
                              param="response_format.json_schema", code="invalid_value")
    return Constraint("json_schema", json.dumps(rf.json_schema.schema_))


def from_text_format(text) -> Constraint | None:
    """The Responses API's `text: {"format": {...}}`: the format's fields are inline."""
    fmt = (text or {}).get("format") if isinstance(text, dict) else None
    if not fmt or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return Constraint("json_object")
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict) and fmt["schema"]:
        return Constraint("json_schema", json.dumps(fmt["schema"]))
    raise errors.APIError(400, "text.format must be text, json_object, or json_schema with a schema",
                          param="text.format", code="invalid_value")


def from_structured(so) -> Constraint | None:
    if so is None:
        return None
    given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                               ("grammar", so.grammar), ("json_object", so.json_object)) if v}
    if len(given) != 1:
        raise errors.APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, "
                                   "json_object", param="structured_outputs", code="invalid_value")
    (kind, value), = given.items()
    return to_constraint(kind, value)


def from_guided(body) -> Constraint | None:
    given = {k: v for k, v in (("json", body.guided_json), ("regex", body.guided_regex),
                               ("choice", body.guided_choice), ("grammar", body.guided_grammar)) if v}
    if len(given) > 1:
        raise errors.APIError(400, "give one guided_* field", param="guided_json", code="invalid_value")
    return to_constraint(*next(iter(given.items()))) if given else None


def to_constraint(kind: str, value) -> Constraint:
    if kind == "json":
        return Constraint("json_schema", value if isinstance(value, str) else json.dumps(value))
    if kind == "choice":
        return Constraint("choice", json.dumps(list(value)))
    if kind == "json_object":
        return Constraint("json_object")
    return Constraint(kind, value)


def logit_bias_of(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: token ids (as JSON keys, so strings) to a bias in [-100, 100]."""
    if not bias:
        return ()
    try:
        return tuple(sorted((int(token), float(value)) for token, value in bias.items()))
    except ValueError:
        raise errors.APIError(400, "logit_bias keys are token ids", param="logit_bias", code="invalid_value") from None

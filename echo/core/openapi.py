"""The OpenAPI 3.1 description of the HTTP server API (served at ``/api/openapi.json``)."""

from __future__ import annotations

from typing import Any

from echo import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _answers(ok: dict[str, Any], *codes: int) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "done", **_json(ok)}}
    for code in (400, 401, 403, *codes):
        responses[str(code)] = {"description": "refused: error.code says why", **_json(_ERROR)}
    return responses


_APP = {"name": "app", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "the app's name (its Socket.IO namespace without the slash)"}
_CHANNEL = {"type": "string", "pattern": r"^[A-Za-z0-9_\-:.@=/]{1,200}$"}
_PUBLISHED = {
    "type": "object", "required": ["ok", "id", "seq", "ts", "delivered"],
    "properties": {
        "ok": {"const": True}, "id": {"type": "string"}, "seq": {"type": "integer"},
        "ts": {"type": "integer", "description": "ms since the epoch"},
        "delivered": {"type": "boolean", "description": "false: a function filtered it"},
        "filteredBy": {"type": "string"}, "droppedBy": {"type": "string"},
        "offset": {"type": "integer", "description": "history channels: its position"},
        "epoch": {"type": "string"},
        "duplicate": {"const": True, "description": "an earlier publish had this idempotencyKey"},
    },
}


def document() -> dict[str, Any]:
    publish_body = {
        "type": "object", "required": ["channel", "message"],
        "properties": {
            "channel": _CHANNEL, "message": {"description": "any JSON value, 64 KiB encoded"},
            "uuid": {"type": "string", "maxLength": 200,
                     "description": "who subscribers see as the sender (default: server)"},
            "idempotencyKey": {"type": "string", "maxLength": 200},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Echo server API", "version": __version__,
                 "description": "How an app's backend publishes, and reads presence and "
                                "history. Authorization: Bearer with the app's admin token "
                                "or a management token."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "bearerFormat": "JWT"}},
            "schemas": {
                "Error": {"type": "object", "required": ["ok", "error"], "properties": {
                    "ok": {"const": False},
                    "error": {"type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string"}, "message": {"type": "string"},
                        "retryAfterMs": {"type": "integer"}}}}},
                "Published": _PUBLISHED,
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/{app}/publish": {"post": {
                "summary": "Publish one message through the channel's functions",
                "operationId": "publish", "parameters": [_APP],
                "requestBody": {"required": True, **_json(publish_body)},
                "responses": _answers({"$ref": "#/components/schemas/Published"},
                                      413, 429, 502, 503),
            }},
            "/api/{app}/broadcast": {"post": {
                "summary": "Publish one message on several channels; an answer per channel",
                "operationId": "broadcast", "parameters": [_APP],
                "requestBody": {"required": True, **_json({
                    "type": "object", "required": ["channels", "message"],
                    "properties": {"channels": {"type": "array", "items": _CHANNEL,
                                                "minItems": 1, "maxItems": 100},
                                   "message": {}, "uuid": {"type": "string"}}})},
                "responses": _answers({
                    "type": "object", "required": ["ok", "results"],
                    "properties": {"ok": {"const": True}, "results": {
                        "type": "object", "additionalProperties": {"oneOf": [
                            {"$ref": "#/components/schemas/Published"}, _ERROR]}}}}, 413, 503),
            }},
            "/api/{app}/presence": {"get": {
                "summary": "Who is subscribed to a channel now, on every node",
                "operationId": "presence",
                "parameters": [_APP, {"name": "channel", "in": "query", "required": True,
                                      "schema": _CHANNEL}],
                "responses": _answers({
                    "type": "object", "required": ["ok", "channel", "count", "clients"],
                    "properties": {
                        "ok": {"const": True}, "channel": {"type": "string"},
                        "count": {"type": "integer"},
                        "clients": {"type": "array", "items": {
                            "type": "object", "required": ["connection"],
                            "properties": {"connection": {"type": "string"},
                                           "uuid": {"type": "string"}}}}}}, 503),
            }},
            "/api/{app}/disconnect": {"post": {
                "summary": "Disconnect every connection of a user, on every node",
                "operationId": "disconnect", "parameters": [_APP],
                "requestBody": {"required": True, **_json({
                    "type": "object", "required": ["uuid"],
                    "properties": {"uuid": {"type": "string", "maxLength": 200}}})},
                "responses": _answers({"type": "object", "required": ["ok", "uuid"], "properties": {
                    "ok": {"const": True}, "uuid": {"type": "string"}}}),
            }},
            "/api/{app}/unsubscribe": {"post": {
                "summary": "Unsubscribe every connection of a user from a channel, on every node",
                "operationId": "unsubscribe", "parameters": [_APP],
                "requestBody": {"required": True, **_json({
                    "type": "object", "required": ["uuid", "channel"],
                    "properties": {"uuid": {"type": "string", "maxLength": 200},
                                   "channel": _CHANNEL}})},
                "responses": _answers({"type": "object", "required": ["ok", "uuid", "channel"],
                                       "properties": {"ok": {"const": True},
                                                      "uuid": {"type": "string"},
                                                      "channel": {"type": "string"}}}),
            }},
            "/api/{app}/channels": {"get": {
                "summary": "The channels with subscribers now, on every node (at most 1,000)",
                "operationId": "channels", "parameters": [_APP],
                "responses": _answers({
                    "type": "object", "required": ["ok", "channels"],
                    "properties": {"ok": {"const": True}, "channels": {"type": "array", "items": {
                        "type": "object", "required": ["channel", "count"],
                        "properties": {"channel": {"type": "string"},
                                       "count": {"type": "integer"}}}}}}, 503),
            }},
            "/api/{app}/history": {"get": {
                "summary": "A history channel's kept messages, as delivered",
                "operationId": "history",
                "parameters": [
                    _APP,
                    {"name": "channel", "in": "query", "required": True, "schema": _CHANNEL},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                "maximum": 1000}},
                    {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0},
                     "description": "only messages after this offset"},
                    {"name": "epoch", "in": "query", "schema": {"type": "string"},
                     "description": "with since: the answer says whether all are there"},
                    {"name": "reverse", "in": "query", "schema": {"type": "boolean"}},
                ],
                "responses": _answers({
                    "type": "object", "required": ["ok", "channel", "publications", "offset", "epoch"],
                    "properties": {
                        "ok": {"const": True}, "channel": {"type": "string"},
                        "publications": {"type": "array", "items": {"type": "object"}},
                        "offset": {"type": "integer"}, "epoch": {"type": "string"},
                        "recovered": {"type": "boolean"}}}, 503),
            }},
        },
    }

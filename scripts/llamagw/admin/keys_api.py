"""The key file from the dashboard: GET /admin/keys, POST /admin/keys (create),
/admin/keys/rotate, /admin/keys/revoke (ADMIN-API.md).

Every edit goes through limits/keyfile.py (the CLI's own path: one line changed, the whole new
file checked with the gateway's parser, written atomically with mode 600, refused when someone
else changed the file meanwhile) in a worker thread; then the gateway reloads the file at once
(Gateway.reload_keys_now), so a new key works, and a rotated or revoked one stops working, when
the answer arrives. Rotating or revoking a key also ends its dashboard sessions.

A new key's secret is in the answer of its creation or rotation only, never anywhere else: the
list shows ids and settings. A key made here is stored hashed by default (the file keeps only its
SHA-256: the secret is shown once anyway); "hashed": false stores it as the CLI does by default.
The last admin key cannot be revoked (the dashboard would lock everyone out; the CLI still can).
"""

from __future__ import annotations

import asyncio
import logging
import time

from llamagw.admin.answers import body_object, json_response
from llamagw.context import Call, Response
from llamagw.errors import GatewayError
from llamagw.limits import keyfile, keys

log = logging.getLogger("gateway")

NUMBER_FIELDS = ("rpm", "concurrency", "tpm", "tpd")
CREATE_FIELDS = frozenset({"key_id", "role", "models", "hashed", *NUMBER_FIELDS})


def _key_id(body: dict) -> str:
    key_id = body.get("key_id")
    if not isinstance(key_id, str) or not keys.KEY_ID_RE.fullmatch(key_id):
        raise GatewayError(400, "key_id must be 1 to 64 of A-Z a-z 0-9 . _ -", "invalid_key_id")
    return key_id


def _edit_error(exc: Exception, key_id: str) -> GatewayError:
    """A KeyEditError / KeyFileError as an answer (their messages never hold a secret; the
    file's path is left out)."""
    message = str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)
    if isinstance(exc, keyfile.KeyEditError):
        if "no key named" in message:
            return GatewayError(404, f"No key named '{key_id}'", "key_not_found")
        if "exists" in message:
            return GatewayError(409, f"A key named '{key_id}' exists already", "key_exists")
        return GatewayError(409, message, "key_file_busy")
    return GatewayError(500, f"The key file cannot be used: {message}", "key_file_error")


def _settings(body: dict) -> dict:
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise GatewayError(400, f"Unknown field(s): {', '.join(unknown)[:200]}", "invalid_field")
    out: dict = {}
    for name in NUMBER_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int:
            raise GatewayError(400, f"{name} must be a whole number", "invalid_setting")
        out[name] = value
    role = body.get("role")
    if role is not None:
        out["role"] = role
    models = body.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and "," not in m
                                                   for m in models):
            raise GatewayError(400, "models must be a list of model names", "invalid_setting")
        out["models"] = ",".join(models)
    checked = {}
    for name, value in out.items():
        try:
            checked[name] = keys.check_setting(name, str(value))
        except ValueError as exc:
            raise GatewayError(400, str(exc), "invalid_setting") from None
    return checked


async def list_keys(call: Call) -> Response:
    services = call.services
    path = services.config.auth_keys_file
    try:
        listed = await asyncio.to_thread(keyfile.list_keys, path)
    except keyfile.KeyEditError:           # no key file yet: no keys
        listed = []
    except keys.KeyFileError as exc:
        raise _edit_error(exc, "") from None
    rate = services.admission.rate
    mono_now, wall_now = services.admission.clock(), time.time()
    out = []
    for item in listed:
        info = item.info
        seen = rate.last_seen(info.key_id)
        out.append({"key_id": info.key_id, "role": info.role, "rpm": info.rpm,
                    "concurrency": info.concurrency, "tpm": info.tpm, "tpd": info.tpd,
                    "models": sorted(info.models) if info.models is not None else None,
                    "hashed": item.hashed,
                    "last_used": None if seen is None else round(wall_now - (mono_now - seen),
                                                                 3)})
    return json_response(200, {"keys": out})


async def create(call: Call) -> Response:
    body = body_object(call)
    key_id = _key_id(body)
    settings = _settings(body)
    hashed = body.get("hashed", True)
    if type(hashed) is not bool:
        raise GatewayError(400, "hashed must be true or false", "invalid_setting")
    info = keys.KeyInfo(key_id, **settings)
    services = call.services
    try:
        secret = await asyncio.to_thread(keyfile.add_key, services.config.auth_keys_file, info,
                                         hashed=hashed)
    except (keyfile.KeyEditError, keys.KeyFileError) as exc:
        raise _edit_error(exc, key_id) from None
    log.info("admin: key %r (role %s) created by %r", key_id, info.role, call.ctx.key_id)
    await services.reload_keys_now()
    return json_response(201, {"key_id": key_id, "secret": secret})


async def rotate(call: Call) -> Response:
    key_id = _key_id(body_object(call))
    services = call.services
    try:
        secret = await asyncio.to_thread(keyfile.rotate_key, services.config.auth_keys_file,
                                         key_id)
    except (keyfile.KeyEditError, keys.KeyFileError) as exc:
        raise _edit_error(exc, key_id) from None
    log.info("admin: key %r rotated by %r", key_id, call.ctx.key_id)
    services.admission.admin.end_sessions(key_id)
    await services.reload_keys_now()
    return json_response(200, {"key_id": key_id, "secret": secret})


def _revoke_unless_last_admin(path: str, key_id: str) -> None:
    listed = keyfile.list_keys(path)
    admins = [k.info.key_id for k in listed if k.info.is_admin]
    if admins == [key_id]:
        raise _LastAdmin()
    keyfile.revoke_key(path, key_id)


class _LastAdmin(Exception):
    pass


async def revoke(call: Call) -> Response:
    key_id = _key_id(body_object(call))
    services = call.services
    try:
        await asyncio.to_thread(_revoke_unless_last_admin, services.config.auth_keys_file,
                                key_id)
    except _LastAdmin:
        raise GatewayError(409, f"'{key_id}' is the last admin key: add another admin key "
                                "first", "last_admin_key") from None
    except (keyfile.KeyEditError, keys.KeyFileError) as exc:
        raise _edit_error(exc, key_id) from None
    log.info("admin: key %r revoked by %r", key_id, call.ctx.key_id)
    services.admission.admin.end_sessions(key_id)
    await services.reload_keys_now()
    return json_response(200, {"key_id": key_id})

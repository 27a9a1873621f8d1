"""Dashboard sign-in: GET /admin/setup, POST /admin/session, GET /admin/session,
POST /admin/session/logout (ADMIN-API.md). Checks and sessions: admin/guard.py.

POST /admin/session is open (it is the way in): same-origin check, the sign-in limits, then an
admin key -> 200 {"csrf", "key_id", "expires_in"} and the HttpOnly, SameSite=Strict session
cookie (Secure when the browser reached us over https: directly or per X-Forwarded-Proto).
The key itself is never stored, logged or sent back.
"""

from __future__ import annotations

from llamagw.admin import origin, sessions
from llamagw.admin.answers import body_object, json_response
from llamagw.admin.guard import SCHEME
from llamagw.context import Call, Response
from llamagw.errors import GatewayError
from llamagw.limits import keys

# What the sign-in page tells an operator whose key file has no admin key.
ADD_ADMIN_KEY = "python3 scripts/keys.py add NAME --role admin"


def _secure(call: Call) -> bool:
    return sessions.request_is_https(SCHEME, call.req.headers)


async def setup(call: Call) -> Response:
    """Open: whether an admin key exists, so the sign-in page can say how to add one."""
    return json_response(200, {"admin_keys": call.services.admission.admin.admin_keys(),
                               "add_admin_key": ADD_ADMIN_KEY})


async def sign_in(call: Call) -> Response:
    req = call.req
    if not origin.same_origin(req.headers, scheme=SCHEME):
        raise GatewayError(403, "A sign-in from another origin", "csrf")
    key = body_object(call).get("key")
    guard = call.services.admission.admin
    sid, session = guard.sign_in(call.client.peer_host, key)
    call.ctx.key_id = session.key_id
    cookie = sessions.cookie_header(sid, secure=_secure(call))
    return json_response(200, {"csrf": session.csrf, "key_id": session.key_id,
                               "expires_in": guard.sessions.expires_in(session)},
                         [("set-cookie", cookie)])


async def session_info(call: Call) -> Response:
    """The signed-in session (a reloaded page gets its CSRF token back). An admin key caller
    has no session: csrf and expires_in are null."""
    guard = call.services.admission.admin
    session = guard.session_of(call.req) if _no_key(call) else None
    if session is None:
        return json_response(200, {"key_id": call.ctx.key_id, "csrf": None,
                                   "expires_in": None})
    return json_response(200, {"key_id": session.key_id, "csrf": session.csrf,
                               "expires_in": guard.sessions.expires_in(session)})


async def sign_out(call: Call) -> Response:
    """The session ends now (the old cookie gets 401 from then on); the cookie is cleared."""
    if _no_key(call):
        call.services.admission.admin.sign_out(call.req)
    return Response(204, [("set-cookie", sessions.clear_cookie_header(secure=_secure(call)))])


def _no_key(call: Call) -> bool:
    """The request was admitted on its session cookie, not on a key."""
    return keys.extract_key(call.req.headers) is None

"""admin: the admin API and the dashboard (sign-in, live channel, keys, logs, system, /ui/).
Handlers for api/routes, the guard for limits/admission, the plane for app."""

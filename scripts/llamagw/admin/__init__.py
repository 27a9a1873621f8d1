"""admin: the admin API (keys, models, usage), to come. Any layer; only app imports it."""

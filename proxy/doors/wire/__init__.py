"""The Postgres wire door: client connections, login, the admin console."""

"""Backends: server connections to Postgres, their pools, replicas and cancel keys."""

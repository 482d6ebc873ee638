"""Shared fixtures. Tests run on real PostgreSQL (DATABASE_URL or the embedded one)."""

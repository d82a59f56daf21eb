"""PostgreSQL fixtures (embedded pgserver)."""

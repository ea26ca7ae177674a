"""Alembic environment and revisions: the only source of cairn's schema."""

"""Alembic migrations of the results database (shipped as package data; see node.db.base.alembic_config)."""

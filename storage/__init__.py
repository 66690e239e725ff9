"""SQLAlchemy 2.0 models, repositories, Alembic migrations and artifact files."""

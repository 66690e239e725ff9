"""Workbench wiring: settings, database access, job runner, CLI and the Streamlit entry point."""

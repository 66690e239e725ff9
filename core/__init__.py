"""Workbench engine: model registry and families, weights, ingest, recommender, training, evaluation, export.

Never imports streamlit or storage; reports progress through callbacks.
"""

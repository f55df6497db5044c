"""Batch risk scoring: model artifacts, OOD detection, chunked Parquet output."""

"""The cohort contract, DICOM reader, simulator and data pipeline."""

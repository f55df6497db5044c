"""The cohort contract, DICOM reader and data pipeline of real cohorts."""

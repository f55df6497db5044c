"""The simulator: a synthetic ICU cohort with known true risk, our embedded default data source."""

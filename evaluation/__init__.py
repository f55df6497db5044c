"""Metrics, the confound audit and the evaluation report."""

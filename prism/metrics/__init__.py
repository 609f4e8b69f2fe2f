"""Scores: corpus metrics and their runner (``corpus``), text metrics with their judges (``text``),
the unbiased pass@k (``passk``), calibration of a quality signal (``calibration``)."""

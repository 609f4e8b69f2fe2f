"""Evaluation: sampling a task's conditioning sequences and scoring them (``evaluate``), several
experiments side by side (``compare``), and the quality signals measured directly (``quality``)."""

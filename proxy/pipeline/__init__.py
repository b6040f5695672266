"""The pipeline: what every request passes through, whatever door it came from."""

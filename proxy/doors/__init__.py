"""Doors: each turns its protocol into requests for the pipeline and replies back."""

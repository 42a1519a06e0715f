"""Trainers for ldm-pipeline: one module per stage on a shared loop (see ARCHITECTURE.md)."""

"""Downstream evaluations run during training and by scripts/evaluate.py (HellaSwag: ``hellaswag``)."""

"""Optuna search over theta rank and gamma."""

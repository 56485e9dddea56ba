"""Helpers for the IntegratedClient, daemon and example tests."""

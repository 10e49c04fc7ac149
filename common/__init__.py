"""Shared pieces of the recipes: only what three or more recipes need."""

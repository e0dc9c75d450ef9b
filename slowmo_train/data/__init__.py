"""Datasets (decoded once into memory) and batching."""

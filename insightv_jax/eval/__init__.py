"""Evaluation: answer extraction/normalisation (extract.py) and benchmark scoring."""

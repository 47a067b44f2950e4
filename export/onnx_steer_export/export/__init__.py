"""Exporting a model to a bundle: load the source, wrap it as segments, trace, simplify, quantize, check parity."""

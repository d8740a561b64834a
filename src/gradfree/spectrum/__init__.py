"""Spectra of captured activations and of weights: computation, report, plots."""

"""Model adapter, masks and patterns, and the layer-by-layer calibration pipeline."""

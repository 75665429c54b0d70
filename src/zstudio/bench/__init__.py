"""The GPU benchmark: full-size Z-Image architecture with random weights, diffusers and our modes side by side."""

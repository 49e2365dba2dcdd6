"""Engine: loads a diffusers pipeline, applies the acceleration tier, runs batches and encodes images."""

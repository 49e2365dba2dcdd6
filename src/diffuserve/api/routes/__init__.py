"""Route modules, one per resource: images, models, health, metrics."""

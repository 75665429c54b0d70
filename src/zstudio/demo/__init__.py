"""The offline demo: a procedural shapes dataset and an evaluator that judges what a picture shows."""

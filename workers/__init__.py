"""Ray Train / Ray Tune workers and MLflow tracking for HarmonicDet experiments."""

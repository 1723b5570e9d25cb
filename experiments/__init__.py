"""forgetting.experiments."""

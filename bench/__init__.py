"""forgetting.bench."""

"""forgetting.core."""

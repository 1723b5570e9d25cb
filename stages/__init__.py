"""forgetting.stages."""

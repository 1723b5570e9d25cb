"""forgetting.evals: scoring models with external evaluation suites (lm-evaluation-harness)."""

"""forgetting.evals: evaluation on validation splits, multiple-choice benchmarks, and scoring models with external
evaluation suites (lm-evaluation-harness)."""

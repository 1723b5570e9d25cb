"""forgetting.training: what the train stage is made of (config, setup, run directories, replay, stop requests)
and the flag machinery every stage shares (`cli`)."""


def run(cfg):  # -> runner.RunResult (imported here lazily: `training.cli` alone must not start JAX)
    """Runs (or reuses, or resumes) the training run of a TrainConfig in this process, as the command line
    `python -m forgetting.stages.train` does; returns its RunResult (run_dir, metrics, status)."""
    from forgetting.training.runner import run as run_config

    return run_config(cfg)

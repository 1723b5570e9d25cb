"""forgetting.training: what the train stage is made of (config, setup, run directories, replay, stop requests)
and the flag machinery every stage shares (`cli`)."""

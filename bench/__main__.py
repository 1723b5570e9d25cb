"""`python -m forgetting.bench`: throughput benchmark (see `bench/train_bench.py` and `--help`)."""
from forgetting.bench.train_bench import main

if __name__ == "__main__":
    main()

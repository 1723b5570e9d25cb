"""`python -m forgetting.bench`: throughput benchmark (see `bench/train_bench.py` and `--help`);
`python -m forgetting.bench sweep ...`: the coefficient-sweep benchmark (`bench/sweep.py`)."""
import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        from forgetting.bench import sweep

        sweep.main(sys.argv[2:])
    else:
        from forgetting.bench.train_bench import main

        main()

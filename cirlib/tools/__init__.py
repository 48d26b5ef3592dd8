"""The tools room: the stage-II and feature-store benchmarks (`bench`, `bench_store`), the GPU check (`gpu_check`) and the
check against the original code's fixture (`verify_original`). Nothing in cirlib imports them; `python -m
cirlib.<tool>` still runs each through a shim at its old path."""

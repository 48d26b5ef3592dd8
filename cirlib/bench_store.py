"""The feature-store cases of `python -m cirlib.bench` (`--cases store-stage1,store-stage2`); kept so that documented commands keep working. The code lives in `cirlib.tools.bench_store`."""
from cirlib.tools.bench_store import STORE_CASES, bench_store  # noqa: F401

"""`python -m cirlib.gpu_check` (`make gpu-check`): kept so that documented commands keep working. The code lives in `cirlib.tools.gpu_check`."""
from cirlib.tools.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())

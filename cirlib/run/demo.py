"""`make demo`: the whole two-stage pipeline on the embedded synthetic world, through the notebooks.

1. Generate the synthetic CIRR-layout world under outputs/synthetic/cirr (skipped when it exists).
2. Run notebooks 00-06 with `params/demo.yaml` through papermill (executed copies in outputs/runs/demo/).
3. Print stage I vs stage II on the synthetic validation split and write outputs/demo/summary.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from cirlib import paths
from cirlib.data import synth
from cirlib.run.batch import run_batch
from cirlib.run_folder import RunFolder

DEMO_PARAMS = paths.REPO_ROOT / "params" / "demo.yaml"
# The pipeline notebooks; 07_explorer is interactive (a widget) and adds nothing to a headless run (make test runs it).
DEMO_NOTEBOOKS = ["00", "01", "02", "03", "04", "05", "06"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=DEMO_PARAMS, help="batch parameters (YAML)")
    parser.add_argument("--overwrite", action="store_true", help="retrain even if the demo runs exist")
    args = parser.parse_args(argv)

    t0 = time.time()
    params = yaml.safe_load(args.params.read_text())
    world = params.pop("world", {})
    root = paths.REPO_ROOT / params["data_root"]
    synth.generate(synth.SynthConfig(layout="cirr", **world), root=root)
    print(json.dumps(synth.summarize(root), indent=1))
    if args.overwrite:
        params["overwrite"] = True
    executed = run_batch(params, DEMO_NOTEBOOKS, output_dir=paths.OUTPUTS / "runs" / params.get("batch_name", "demo"))
    wall = time.time() - t0

    evaluation = RunFolder.of("stage2", params["stage2_run"], params.get("outputs", "")).evaluation_file
    metrics = paths.read_json(evaluation, "stage-II evaluation record")
    summary = {
        "dataset": "synthetic CIRR layout",
        "data_root": str(root.relative_to(paths.REPO_ROOT)),
        "k": metrics["k"],
        "queries": metrics.get("queries"),
        "stage1": metrics["stage1"],
        "stage2": metrics["stage2"],
        "wall_time_s": round(wall, 1),
        "executed_notebooks": [str(p.relative_to(paths.REPO_ROOT)) for p in executed],
    }
    out = paths.OUTPUTS / "demo" / "summary.json"
    paths.write_json(out, summary)
    print(format_table(summary))
    print(f"\nwrote {out.relative_to(paths.REPO_ROOT)}; figures in {paths.FIGURES.relative_to(paths.REPO_ROOT)}/; "
          f"wall time {wall / 60:.1f} min")
    return 0


def format_table(summary: dict) -> str:
    keys = [k for k in ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3") if k in summary["stage1"]]
    lines = [f"Synthetic validation split ({summary['queries']} queries), stage II re-ranks the top-{summary['k']}",
             f"{'metric':<11}{'stage I':>9}{'stage II':>10}{'gain':>8}"]
    for k in keys:
        a, b = summary["stage1"][k], summary["stage2"][k]
        lines.append(f"{k:<11}{a:>9.2f}{b:>10.2f}{b - a:>+8.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

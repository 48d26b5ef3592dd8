"""`python -m cirlib.rerank`: re-rank another system's candidates with any stage-II run.

    python -m cirlib.rerank --candidates FILE --stage2 RUN [--format auto|cirr|circo|trec|topk|jsonl] [--split val]
        [--k 50] [--fusion-weight W] [--missing-queries error|drop] [--out DIR] [--json]

The dataset, data root, categories and models are the stage-II run's (a name under <outputs>/stage2/ or a run
folder); `--data-root` and `--categories` override them. `--dataset circo --data-root CIRCO_ROOT` re-ranks CIRCO
lists (at least 50 ids each; every query on test, where `--missing-queries drop` is refused) with a CIRR-trained run
through notebook 09's gallery index (`--index`).
Writes the re-ranked file, metrics.json (imported vs re-ranked on a validation split, the ceiling, per-query
outcomes, latency, the fusion sweep when the file has scores) and provenance.json into --out (default
<outputs>/rerank/<run>_<split>_<file stem>/); on CIRR's and CIRCO's test split also the server files, checked first.
`--json` prints one JSON object whose `imported` and `reranked` hold the dataset's metrics (e.g. R@1, Rsubset@1,
mAP@10). Errors: one line on stderr and exit status 2. The code lives in `cirlib.workbook.rerank_any`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cirlib import data as cdata
from cirlib.run.search import path_or_name, positive  # the command lines' argument types
from cirlib.run_folder import RunFolderError
from cirlib.workbook.config import RerankConfig

def _weight(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value}: expected a weight in [0, 1]")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cirlib.rerank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", required=True, help="the ranked-list file ({category} for per-category files)")
    p.add_argument("--stage2", required=True, help="stage-II run name under <outputs>/stage2/, or a run folder")
    p.add_argument("--format", default="auto", help="auto | cirr | circo | trec | topk | jsonl (the file's format; "
                   "checked by the reader)")
    p.add_argument("--split", default="val")
    p.add_argument("--k", type=positive, default=50, help="candidates re-ranked per query")
    p.add_argument("--fusion-weight", type=_weight, default=0.0, help="weight of the imported score (needs scores)")
    p.add_argument("--fusion-sweep", default=RerankConfig.fusion_sweep, help="weights swept ('' = none)")
    p.add_argument("--missing-queries", choices=("error", "drop"), default="error")
    p.add_argument("--dataset", default="", help="the dataset the candidates rank (default: the stage-II run's; "
                   "circo: CIRCO through a gallery index, with a CIRR-trained run)")
    p.add_argument("--data-root", default="", help="dataset root (default: the stage-II run's; CIRCO: its root)")
    p.add_argument("--index", default="", help="CIRCO's gallery index folder (default: notebook 09's)")
    p.add_argument("--categories", default="", help="FashionIQ categories (default: the stage-II run's)")
    p.add_argument("--scoring", choices=("shared", "pairs"), default="shared")
    p.add_argument("--out", default="", help="result folder (default <outputs>/rerank/<name>/)")
    p.add_argument("--outputs", default="", help="outputs root (default <repo>/outputs)")
    p.add_argument("--overwrite", action="store_true", help="re-rank even when a matching record exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def config_from(args: argparse.Namespace) -> RerankConfig:
    """The RerankConfig of the parsed command line (paths made absolute from the current directory)."""
    absolute = lambda text: str(Path(text).expanduser().resolve()) if text else ""  # noqa: E731
    return RerankConfig(candidates=absolute(args.candidates), format=args.format,
                        stage2_run=path_or_name(args.stage2), split=args.split, k=args.k,
                        fusion_weight=args.fusion_weight, fusion_sweep=args.fusion_sweep,
                        missing_queries=args.missing_queries, dataset=args.dataset,
                        data_root=absolute(args.data_root), index=absolute(args.index),
                        categories=args.categories, scoring=args.scoring, out=absolute(args.out),
                        outputs=absolute(args.outputs), overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from cirlib.workbook.rerank_any import rerank_any  # torch and the models: after the arguments are parsed

    try:
        result = rerank_any(config_from(args))
    except (RunFolderError, cdata.DatasetError, FileNotFoundError, ValueError) as err:
        print(f"rerank: {type(err).__name__}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    print(f"{'reused' if result.reused else 'wrote'} {result.out_dir}")
    if result.imported:
        print(result.table().to_string())
        if result.record["analysis"]["outcomes"]:  # single-target datasets (CIRCO has several ground truths)
            print(result.outcome_table().to_string())
    print(f"latency {result.record['analysis']['latency_ms_per_query']:.2f} ms per query")
    return 0

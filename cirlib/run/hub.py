"""`python -m cirlib.hub`: publish a trained model as a Hub-ready folder and check a published card.

    python -m cirlib.hub export RUN --out DIR [--stage stage1|stage2] [--outputs ROOT] [--push REPO_ID]
    python -m cirlib.hub export --from-original FILE --preset blip-base|CONFIG.json [--tokenizer VOCAB] --out DIR
    python -m cirlib.hub verify DIR_OR_HF_REF --data-root ROOT [--tolerance 0.01]

`export` writes config.json, model.safetensors, the tokenizer files, cirlib.json, a stage-II model's validation
top-k files and stage I, and README.md (a model card whose metadata holds the run's validation results); RUN is a
run name (under <outputs>/stage2/, else <outputs>/stage1/) or a run folder. `--push` uploads the folder with
huggingface_hub. `verify` re-evaluates the model on the validation split under its card's protocol and exits
non-zero naming each metric that differs from the card by more than the tolerance (percentage points).
The code lives in `cirlib.workbook.hub`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cirlib import data as cdata
from cirlib.run_folder import RunFolder, RunFolderError
from cirlib.workbook import hub


def _run(text: str, stage: str | None, outputs: str) -> RunFolder:
    """The run folder RUN names: a path, or a name under <outputs>/<stage>/ (stage2 first when not given)."""
    path = Path(text).expanduser()
    if "/" in text or path.is_dir():
        return RunFolder.at(path.resolve())
    for candidate in ([stage] if stage else ["stage2", "stage1"]):
        run = RunFolder.of(candidate, text, outputs or None)
        if run.path.is_dir():
            return run
    raise RunFolderError(f"no run {text!r} under {RunFolder.of('stage1', text, outputs or None).outputs} "
                         f"({stage or 'stage2 or stage1'}): give a run name or a run folder")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cirlib.hub", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a Hub-ready folder of a run or an original checkpoint")
    ex.add_argument("run", nargs="?", help="run name or run folder")
    ex.add_argument("--out", required=True, help="the folder to write")
    ex.add_argument("--stage", choices=("stage1", "stage2"), default=None)
    ex.add_argument("--outputs", default="", help="outputs root holding the run folders")
    ex.add_argument("--from-original", default="", help="an original released checkpoint (.pt) instead of a run")
    ex.add_argument("--preset", default="blip-base", help="with --from-original: a model preset, or a config.json of ModelConfig fields")
    ex.add_argument("--tokenizer", default="", help="with --from-original: vocab.txt or bert-base-uncased folder")
    ex.add_argument("--push", default="", metavar="REPO_ID", help="upload the folder to this Hub model repo")
    ve = sub.add_parser("verify", help="re-evaluate a published model and compare with its card")
    ve.add_argument("model", help="an exported folder or hf:<repo id>[@revision]")
    ve.add_argument("--data-root", required=True, help="the dataset root")
    ve.add_argument("--tolerance", type=float, default=hub.TOLERANCE, help="allowed difference, percentage points")
    return parser


def _export(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser().resolve()
    if args.from_original:
        tokenizer = Path(args.tokenizer).expanduser().resolve() if args.tokenizer else None
        if tokenizer is None and not args.preset.endswith(".json"):
            raise ValueError("--from-original with a preset name needs --tokenizer (vocab.txt or bert-base-uncased "
                             "folder: the vocabulary size)")
        config = hub.original_config(args.preset, tokenizer or "")
        hub.export_original(Path(args.from_original).expanduser().resolve(), out, config=config,
                            tokenizer=tokenizer, preset=Path(args.preset).name, repo_id=args.push)
    elif args.run:
        hub.export_run(_run(args.run, args.stage, args.outputs), out, repo_id=args.push)
    else:
        raise ValueError("give a RUN or --from-original FILE")
    print(f"exported {out}")
    if args.push:
        print(f"pushed: {hub.push(out, args.push)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            return _export(args)
        ref = args.model if args.model.startswith("hf:") else str(Path(args.model).expanduser().resolve())
        result = hub.verify(ref, Path(args.data_root).expanduser().resolve(), tolerance=args.tolerance)
        print("\n".join(result.lines()))
        return 0 if result.ok else 1
    except (hub.HubError, RunFolderError, cdata.DatasetError, FileNotFoundError, ValueError) as err:
        print(f"hub: {type(err).__name__}: {err}", file=sys.stderr)
        return 2

"""`python -m cirlib.search`: build a gallery index of any folder of images and query it with both stages.

    python -m cirlib.search index IMAGE_DIR --stage1 RUN_OR_CHECKPOINT --out INDEX_DIR [--batch-size N] [--device D]
    python -m cirlib.search query INDEX --image ref.jpg --text "make it red" [--stage2 RUN] [--k 50] [--top 10] [--json]

`index` embeds every jpg/jpeg/png/webp under IMAGE_DIR (recursively) with stage I (a run name under
outputs/stage1/, a run folder, or the original's released checkpoint file with --tokenizer and --preset) and prints
what changed: added / removed / changed / unchanged / unreadable files. Re-running it embeds only new and changed
files; an interrupted build resumes. `query` ranks the index with stage I (the reference image fused with the text)
and re-ranks the top K with stage II; `--image` is an image file or a name in the index. A reference that is in the
index is left out of its results unless --keep-reference. Paths given on the command line are relative to the
current directory; the code lives in `cirlib.workbook.search`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cirlib import data as cdata
from cirlib.run_folder import RunFolderError
from cirlib.workbook import search as S


def path_or_name(text: str) -> str:
    """A command-line path made absolute (from the current directory); a bare run name or `hf:<repo id>` stays."""
    if text.startswith("hf:"):
        return text
    p = Path(text).expanduser()
    return str(p.resolve()) if (p.exists() or "/" in text) else text


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def _device(text: str) -> str:
    """A device the machine has: 'cuda...' without CUDA is refused here, not by a torch traceback later."""
    import torch

    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine (use cpu, or leave --device out)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cirlib.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="build or update the gallery index of a folder")
    ix.add_argument("image_dir", help="folder of images (searched recursively)")
    ix.add_argument("--stage1", required=True, help="stage-I run name, run folder, exported folder, hf:<repo id>, or original checkpoint file")
    ix.add_argument("--out", required=True, help="index folder")
    ix.add_argument("--batch-size", type=positive, default=32)
    ix.add_argument("--device", type=_device, default=None, help="e.g. cpu, cuda, cuda:1 (default: CUDA when available)")
    ix.add_argument("--tokenizer", default="", help="for a checkpoint file: vocab.txt or bert-base-uncased folder")
    ix.add_argument("--preset", default="blip-base", help="for a checkpoint file: the model preset")
    ix.add_argument("--refuse-other-stage1", action="store_true",
                    help="refuse (instead of rebuild) an index built with another stage I")
    ix.add_argument("--json", action="store_true", help="print the report as JSON")
    q = sub.add_parser("query", help="search an index with a reference image and a text")
    q.add_argument("index", help="index folder")
    q.add_argument("--image", required=True, help="reference: an image file or a name in the index")
    q.add_argument("--text", required=True, help="modification text")
    q.add_argument("--stage1", default=None, help="stage I (default: the one the index was built with)")
    q.add_argument("--stage2", default=None, help="stage-II run name or folder, an exported folder, or hf:<repo id> (default: stage I only)")
    q.add_argument("--k", type=positive, default=50, help="stage-I candidates re-ranked by stage II")
    q.add_argument("--top", type=positive, default=10, help="results printed per stage")
    q.add_argument("--keep-reference", action="store_true", help="keep an indexed reference in its own results")
    q.add_argument("--search", choices=("exact", "faiss"), default="exact")
    q.add_argument("--stage2-tokens", choices=S.STAGE2_TOKENS, default="ondemand",
                   help="candidates' stage-II tokens: encoded per query, or kept in a store in the index folder")
    q.add_argument("--device", type=_device, default=None)
    q.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.command == "index":
            t0 = time.time()
            report = S.index_folder(str(Path(args.image_dir).expanduser().resolve()), path_or_name(args.stage1),
                                    str(Path(args.out).expanduser().resolve()), batch_size=args.batch_size,
                                    device=args.device, preset=args.preset,
                                    tokenizer=path_or_name(args.tokenizer) if args.tokenizer else "",
                                    replace=not args.refuse_other_stage1)
            if args.json:
                print(json.dumps(report.to_dict(), indent=1))
            else:
                print(report.summary())
                print(f"wall time {time.time() - t0:.1f} s")
            return 0
        # an existing file is the reference (made absolute); anything else is looked up as a name in the index
        image = str(Path(args.image).expanduser().resolve()) if Path(args.image).expanduser().is_file() else args.image
        (result,) = S.rank(str(Path(args.index).expanduser().resolve()), [image], [args.text],
                           stage1=path_or_name(args.stage1) if args.stage1 else None,
                           stage2=path_or_name(args.stage2) if args.stage2 else None, k=args.k, top=args.top,
                           exclude_reference=not args.keep_reference, search=args.search, device=args.device,
                           stage2_tokens=args.stage2_tokens)
        if args.json:
            print(json.dumps(result.to_dict(), indent=1))
            return 0
        where = ("not in the index" if result.reference_in_index is None else
                 f"in the index as {result.reference_in_index} "
                 f"({'excluded from' if result.reference_excluded else 'kept in'} the results)")
        print(f"reference {result.reference}: {where}; text {result.text!r}; "
              f"{'stage II re-ranked the top ' + str(result.k) if result.stage2 is not None else 'stage I only'}")
        print(result.table().to_string())
        return 0
    except (S.GalleryIndexError, RunFolderError, cdata.DatasetError, FileNotFoundError, ValueError) as err:
        print(f"search: {type(err).__name__}: {err}", file=sys.stderr)
        return 2

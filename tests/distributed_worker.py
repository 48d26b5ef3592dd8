"""One optimizer step of each stage through `cirlib.train.fit`, for tests/test_distributed.py to launch.

    python tests/distributed_worker.py WORLD_ROOT OUT_DIR BATCH_SIZE                      # one process
    torchrun --nproc_per_node 2 tests/distributed_worker.py WORLD_ROOT OUT_DIR BATCH_SIZE  # two, gloo

Tiny models with every dropout and drop-path at 0, so a step is a deterministic function of the global batch: two
processes with batch b must reach the loss and weights of one process with batch 2b. Writes OUT_DIR/stage1/ and
OUT_DIR/stage2/ (fit's run folders: metrics.jsonl, checkpoints/last/model.safetensors).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib.models.config import preset
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import Stage2Model
from cirlib.train.tasks import MinedTripletDataset, Stage1Task, Stage2Task
from cirlib.data.tokenizer import build_tokenizer
from cirlib.train.loop import TrainConfig, fit


def check_gathers(out: Path) -> None:
    """Uneven and empty shares through both gathers, and the gradient of the differentiable one: rank r holds
    r + 2 rows (all_gather_no_grad: rank 1 holds none) and its loss is (weights_r * gathered).sum()."""
    r = dist.rank()
    rows = torch.arange(3.0) + 10 * r
    uneven = dist.all_gather_no_grad(rows[:r + 2])
    empty = dist.all_gather_no_grad(rows[:2] if r == 0 else torch.empty(0))
    x = (torch.arange(r + 2, dtype=torch.float32) + 1).requires_grad_()
    gathered = dist.all_gather_with_grad(x)
    weights = torch.arange(gathered.shape[0], dtype=torch.float32) * (r + 1)
    (weights * gathered).sum().backward()
    torch.save({"uneven": uneven, "empty": empty, "gathered": gathered.detach(), "grad": x.grad},
               out / f"gathers_rank{r}.pt")


def main(root: Path, out: Path, batch_size: int) -> None:
    dist.init_process_group(cpu=True)
    out.mkdir(parents=True, exist_ok=True)
    check_gathers(out)
    tok = build_tokenizer(root / "vocab.txt")
    base = preset("tiny")
    config = dataclasses.replace(
        base, stage1_drop_path_rate=0.0, stage2_drop_path_rate=0.0,
        text=dataclasses.replace(base.text, vocab_size=tok.vocab_size, hidden_dropout=0.0, attention_dropout=0.0))
    train = cdata.load_split("cirr", root, "train")
    transform = cdata.targetpad_transform(1.25, config.vision.image_size)
    # AdamW's first step is lr * g / (|g| + eps). With the default eps it is about lr * sign(g), and float noise on a
    # near-zero gradient moves a weight by up to 2 lr; with eps = 1 and no decay it is a smooth function of g (about
    # g where |g| << 1), so equal weights after the step mean equal gradients.
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=1.0, eps=1.0, weight_decay=0.0, max_steps_per_epoch=1,
                      validate_every=None, log_every=1, progress=False, precision="fp32", schedule="constant")

    def no_validation() -> dict[str, float]:
        return {"none": 0.0}

    torch.manual_seed(0)
    stage1 = Stage1Model(config)
    task1 = Stage1Task(stage1, tok, [train], transform, batch_size=batch_size, train_image_encoder=True,
                       validate_fn=no_validation, selection_key="none", symmetric_loss=True, seed=0)
    fit(task1, cfg, out / "stage1", overwrite=True)

    torch.manual_seed(1)
    stage2 = Stage2Model(config)
    mined = MinedTripletDataset(train, transform, None, n_topk=0, seed=0, n_set=1)
    task2 = Stage2Task(stage2, stage1, tok, mined, batch_size=batch_size, hard_negatives=1, inbatch_negatives=-1,
                       stage1_train_mode=False, zt_from_stage1_vit=False, validate_fn=no_validation,
                       selection_key="none", scoring="shared")
    fit(task2, cfg, out / "stage2", overwrite=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))

"""Data-parallel training and sharded evaluation on 2 CPU processes (gloo), launched as the README says:

    torchrun --nproc_per_node 2 tests/distributed_worker.py ...
    accelerate launch --multi_gpu --num_processes 2 -m cirlib.launch all params.yaml --cpu

- one optimizer step of stage I and of stage II with 2 processes x 4 samples reaches the loss and weights of one
  process with 8 samples (it would not without gathering: the local loss sees 4 candidates instead of 8);
- `cirlib.launch` on 2 processes writes the same top-k file, stage-II labels and metrics as on one process;
- the helpers: shards, gathers, samplers sharded without duplicates, FAISS search equal to exact search.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib.data import synth
from cirlib.retrieval.search import GalleryFeatures, rank_gallery, topk_from_ranking
from cirlib.retrieval.topk import TopK

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} not found beside {sys.executable} (installed with torch / accelerate)"
    return str(path)


def torchrun(n: int) -> list[str]:
    """The README's `torchrun --nproc_per_node N`, on a free local port."""
    return [_script("torchrun"), "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port())]


def accelerate_launch(n: int) -> list[str]:
    """The README's `accelerate launch --multi_gpu --num_processes N`, on a free local port."""
    return [_script("accelerate"), "launch", "--multi_gpu", "--num_processes", str(n),
            "--main_process_port", str(_free_port())]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    # 66 validation queries: with evaluation batches of 64 both processes get queries, and uneven shares.
    root = tmp_path_factory.mktemp("dist_world") / "cirr"
    synth.generate(synth.SynthConfig(layout="cirr", n_train=48, n_val=66, n_test=8, seed=3), root=root)
    return root


# ------------------------------------------------------------------------------------------------ training


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "epoch"], records  # written once, by the main process
    return [r["loss"] for r in records]


@pytest.mark.distributed
def test_two_processes_of_4_train_as_one_process_of_8(world, tmp_path):
    worker = str(TESTS / "distributed_worker.py")
    _run([sys.executable, worker, str(world), str(tmp_path / "one"), "8"], tmp_path)
    _run([*torchrun(2), worker, str(world), str(tmp_path / "two"), "4"], tmp_path)
    for stage in ("stage1", "stage2"):
        one, two = tmp_path / "one" / stage, tmp_path / "two" / stage
        loss_one, loss_two = _losses(one), _losses(two)
        assert abs(loss_one[0] - loss_two[0]) <= 1e-5, (stage, loss_one, loss_two)
        a = load_file(one / "checkpoints" / "last" / "model.safetensors")
        b = load_file(two / "checkpoints" / "last" / "model.safetensors")
        assert a.keys() == b.keys()
        diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] <= 1e-5, (stage, worst, diffs[worst])
    # the gathers themselves, on the two processes (see distributed_worker.check_gathers)
    got = [torch.load(tmp_path / "two" / f"gathers_rank{r}.pt", weights_only=True) for r in range(2)]
    for g in got:
        assert g["uneven"].tolist() == [0.0, 1.0, 10.0, 11.0, 12.0]  # rank 0's 2 rows, then rank 1's 3
        assert g["empty"].tolist() == [0.0, 1.0]  # rank 1 contributed nothing
        assert g["gathered"].tolist() == [1.0, 2.0, 1.0, 2.0, 3.0]
    # d(sum of both losses)/dx_r: loss_s = sum_j (s + 1) * j * gathered_j, and rank r owns rows lo_r .. lo_r + n_r
    assert got[0]["grad"].tolist() == [(1 + 2) * j for j in (0, 1)]
    assert got[1]["grad"].tolist() == [(1 + 2) * j for j in (2, 3, 4)]


# ------------------------------------------------------------------------------------------------ evaluation

PARAMS = """\
data_root: {root}
dataset: cirr
preset: tiny
stage1_run: s1
stage2_run: s2
seed: 0
precision: fp32
validate_every: 0
topk_k: 20
topk_splits: val
k: 16
reranker: joint
init: scratch
scoring: pairs
notebooks:
  01_stage1_train: {{train_image_encoder: true, epochs: 1, max_epoch: 1, lr: 1.0e-3, batch_size: 4, max_steps_per_epoch: 1}}
  03_stage2_train: {{epochs: 1, max_epoch: 1, lr: 1.0e-3, batch_size: 4, max_steps_per_epoch: 1}}
"""


@pytest.mark.distributed
def test_sharded_evaluation_equals_one_process(world, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.format(root=world))
    one, two = tmp_path / "one", tmp_path / "two"
    out = _run([sys.executable, "-m", "cirlib.launch", "all", str(params), "--outputs", str(one)], tmp_path)
    assert [json.loads(line)["step"] for line in out.splitlines() if line.startswith("{")] == [
        "train-stage1", "topk", "train-stage2", "evaluate"]
    # The same trained runs, without their top-k file and evaluation: two processes redo those (and reuse training).
    shutil.copytree(one, two)
    for produced in ("stage1/s1/topk_val.pt", "stage1/s1/candidate_recall.json", "stage2/s2/metrics.json",
                     "stage2/s2/stage2_labels_val.pt"):
        (two / produced).unlink()
    out = _run([*accelerate_launch(2), "-m", "cirlib.launch", "all", str(params), "--outputs", str(two), "--cpu"],
               tmp_path)
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["step"], r["processes"]) for r in reports] == [
        ("train-stage1", 2), ("topk", 2), ("train-stage2", 2), ("evaluate", 2)]  # printed once, by rank 0
    assert reports[0]["reused"] and reports[2]["reused"]

    a = TopK.load(one / "stage1/s1/topk_val.pt", dataset="cirr", split="val")
    b = TopK.load(two / "stage1/s1/topk_val.pt", dataset="cirr", split="val")
    assert a.num_queries == b.num_queries == 66 and a.k == b.k == 20
    assert np.array_equal(a.sorted_index_names, b.sorted_index_names)
    assert (a.scores - b.scores).abs().max().item() <= 1e-6
    assert torch.equal(a.labels, b.labels) and torch.equal(a.group_labels, b.group_labels)
    assert np.array_equal(a.group_names, b.group_names)
    assert json.loads((one / "stage1/s1/candidate_recall.json").read_text()) == json.loads(
        (two / "stage1/s1/candidate_recall.json").read_text())
    # the evaluation records agree except for what produced them (the top-k files' bytes may differ in float noise)
    m1, m2 = (json.loads((d / "stage2/s2/metrics.json").read_text()) for d in (one, two))
    made = ("produced_by", "provenance")
    assert {k: v for k, v in m1.items() if k not in made} == {k: v for k, v in m2.items() if k not in made}
    assert (m1["provenance"]["processes"], m2["provenance"]["processes"]) == (1, 2)  # each says how it ran
    assert torch.equal(torch.load(one / "stage2/s2/stage2_labels_val.pt", weights_only=True),
                       torch.load(two / "stage2/s2/stage2_labels_val.pt", weights_only=True))


# ------------------------------------------------------------------------------------------------ helpers


def test_shards_cover_everything_once_on_batch_boundaries():
    for n, parts, multiple in [(0, 2, 1), (5, 3, 1), (66, 2, 64), (130, 4, 16), (7, 8, 1)]:
        shards = [dist.shard_range(n, multiple, part=r, parts=parts) for r in range(parts)]
        assert [i for s in shards for i in s] == list(range(n))
        assert all(s.start % multiple == 0 for s in shards if len(s))
    assert dist.shard_range(10) == range(10)  # no process group: everything
    with pytest.raises(ValueError, match="part must be in"):
        dist.shard_range(4, part=2, parts=2)


def test_gathers_are_the_identity_on_one_process():
    t = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(t) is t and dist.all_gather_no_grad(t) is t
    assert dist.gather_objects({"a": 1}) == [{"a": 1}] and dist.broadcast_object(5) == 5


def test_a_launch_without_a_process_group_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 .* cirlib.launch"):
        dist._check_launch(1)


class _Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 37

    def __getitem__(self, i: int) -> dict:
        return {"i": torch.tensor(i)}


def test_samplers_are_sharded_without_duplicates():
    """Accelerate's sharding of the tasks' loaders: rank r takes global batches r, r+N, ...; together the ranks'
    step s is one process's step s with batch N*b, and no sample is seen twice."""
    from accelerate.data_loader import prepare_data_loader

    from cirlib.train.tasks import _loader

    single = [b["i"].tolist() for b in _loader(_Items(), 8, seed=5, num_workers=0)]
    per_rank = [[b["i"].tolist() for b in prepare_data_loader(_loader(_Items(), 4, seed=5, num_workers=0),
                                                              num_processes=2, process_index=r)]
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single) == 4
    assert [x + y for x, y in zip(*per_rank)] == single
    seen = [i for rank in per_rank for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 32


def test_faiss_search_equals_exact_search(tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu is the optional extra '.[faiss]' (also in '.[test]')")
    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=4, n_val=40, n_test=2, seed=2), root=tmp_path / "w")
    sd = cdata.load_split("cirr", root, "val")
    g = torch.nn.functional.normalize(torch.randn(len(sd.gallery), 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(len(sd.queries), 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    gallery = GalleryFeatures(names=list(sd.gallery), embeds=g, tokens=None)
    exact = rank_gallery(sd, sd.queries, gallery, q, 25)
    fast = rank_gallery(sd, sd.queries, gallery, q, 25, search="faiss", chunk=7)
    a, b = (topk_from_ranking(sd, sd.queries, gallery, r) for r in (exact, fast))
    assert a.k == b.k == 25 and np.array_equal(a.sorted_index_names, b.sorted_index_names)
    assert (a.scores - b.scores).abs().max().item() <= 1e-5
    assert np.array_equal(a.group_names, b.group_names) and torch.equal(a.labels, b.labels)
    refs = [q.reference for q in sd.queries]
    assert all(r not in row for r, row in zip(refs, b.sorted_index_names.tolist()))  # the reference is never ranked
    within = exact.target_rank < 25
    assert torch.equal(exact.target_rank[within], fast.target_rank[within])
    assert (fast.target_rank[~within] == fast.depth).all() and exact.depth == len(sd.gallery)
    with pytest.raises(ValueError, match="unknown search"):
        rank_gallery(sd, sd.queries, gallery, q, 5, search="annoy")


@pytest.mark.parametrize("inbatch", [-1, 2])
def test_stage2_candidate_rows_of_a_share_are_the_global_batch_rows(inbatch):
    from cirlib.train.tasks import Stage2Task

    task = Stage2Task.__new__(Stage2Task)  # only candidate_index's arithmetic is used here
    task.hard_negatives, task.inbatch_negatives = 2, inbatch
    single = task.candidate_index(8)  # rows into [8 targets ; 8 x 2 hard negatives]
    for rank in range(2):
        share = task.candidate_index(4, rank, 2)  # rows into [8 targets (all processes) ; 4 x 2 own hard negatives]
        # the same candidates: targets by global index, hard negatives re-based to this process's own block
        own = share.clone()
        hard = own >= 8
        own[hard] += rank * 4 * 2
        assert torch.equal(own, single[rank * 4:(rank + 1) * 4])
    assert single.shape[1] == 1 + 2 + (7 if inbatch < 0 else 2)


def test_launch_builds_each_step_config_as_the_batch_runner_would():
    from cirlib.run import launch
    from cirlib.workbook.config import Stage1Config, Stage2TrainConfig

    params = {"dataset": "cirr", "preset": "tiny", "stage1_run": "a", "stage2_run": "b", "batch_size": 8,
              "notebooks": {"01_stage1_train": {"epochs": 3}, "03": {"batch_size": 4}}}
    steps = launch.parse_steps("all")
    assert steps == ["train-stage1", "topk", "train-stage2", "evaluate"]
    over = launch.parse_overrides(["lr=2.0e-5", "stage2_run=c", "search=faiss"])
    s1, topk, s2, ev = launch.step_configs(params, steps, over)
    assert isinstance(s1, Stage1Config) and isinstance(s2, Stage2TrainConfig)
    assert (s1.stage1_run, s1.epochs, s1.batch_size, s1.lr, s1.search) == ("a", 3, 8, 2e-5, "faiss")
    assert (topk.stage1_run, topk.search) == ("a", "faiss")
    assert (s2.stage2_run, s2.stage1_run, s2.batch_size, s2.lr) == ("c", "a", 4, 2e-5)
    assert s2.epochs == Stage2TrainConfig.epochs  # notebook 01's section applies to notebook 01 only
    assert ev.stage2_run == "c"
    with pytest.raises(launch.LaunchError, match="unknown step 'train'"):
        launch.parse_steps("train,topk")
    with pytest.raises(launch.LaunchError, match=r"--set \['bogus'\]"):
        launch.step_configs(params, ["topk"], {"bogus": 1})
    with pytest.raises(launch.LaunchError, match="key=value"):
        launch.parse_overrides(["epochs"])

"""The recall grid (issue 8): MQAR and needle-in-a-haystack for every MC aggregation on gla and
delta memory, against a softmax-attention transformer of the same width.

    python -m evals.recall          # the default grid, 61 min on 2 CPU cores
    python -m evals.recall --quick  # a smoke run of a few minutes

Every model gets the same training steps and the same learning-rate sweep; the table reports each
model at its best learning rate (mean accuracy over lengths). Runs go to `<out>/runs.jsonl` as they
finish, and a second call skips the runs already there, so an interrupted grid resumes.
`evals.recall_report` turns the runs into docs/recall.md's table and plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from evals.grid_tasks import grid_task, mean
from evals.mqar import MQARConfig
from evals.task_train import TaskTrainConfig, train_on_task
from evals.transformer import Transformer, TransformerConfig
from models.config import AGGREGATIONS, ModelConfig
from models.model import MCModel

TRANSFORMER = "transformer"


@dataclass(frozen=True)
class GridConfig:
    # The models: every aggregation on each memory, plus the transformer.
    memories: tuple[str, ...] = ("gla", "delta")
    aggregations: tuple[str, ...] = AGGREGATIONS
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden: int = 256
    segment_size: int = 64
    # MQAR: evaluated at these lengths with these pair counts; trained on a mixture of them and of
    # the short warm-up shapes, which is where the recall mechanism is learnt first.
    lengths: tuple[int, ...] = (256, 512, 1024)
    pairs: tuple[int, ...] = (16, 32, 48)
    warmup_shapes: tuple[tuple[int, int], ...] = ((64, 4), (128, 8))
    vocab_size: int = 128
    mqar_steps: int = 1500
    mqar_mixture_weights: tuple[float, ...] = (4, 2, 1, 1, 1)   # warm-up shapes first, then lengths
    # Needle: trained on haystacks of the same lengths plus short warm-up ones (where the copy
    # is learnt first, as MQAR's warm-up shapes), with the bundled model's tokenizer; scored
    # through the engine at these depths.
    needle_steps: int = 1000
    needle_tokens_per_batch: int = 4096
    needle_warmup_lengths: tuple[int, ...] = (64, 128)
    needle_mixture_weights: tuple[float, ...] = (2, 1, 1, 1, 1)  # warm-up lengths first, then lengths
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_per_cell: int = 8
    # Shared by every model. The default (61 min on 2 cores) trains each model once at 3e-3;
    # `--lrs 1e-3,3e-3` sweeps MQAR (its phase transition is sensitive to the learning rate).
    lrs: tuple[float, ...] = (3e-3,)
    needle_lrs: tuple[float, ...] = (3e-3,)
    seeds: tuple[int, ...] = (0,)
    tokens_per_batch: int = 4096
    eval_batches: int = 4

    def __post_init__(self) -> None:
        if len(self.lengths) != len(self.pairs):
            raise ValueError("lengths and pairs must have the same number of entries")
        for seq_len, pairs in zip(self.lengths, self.pairs):
            MQARConfig(self.vocab_size, seq_len, pairs)  # raises on an impossible task
        if not self.lrs or not self.needle_lrs or not self.seeds:
            raise ValueError("need at least one learning rate per task and one seed")
        if min(self.lrs + self.needle_lrs) <= 0:
            raise ValueError("learning rates must be positive")
        if len(self.mqar_mixture_weights) != len(self.warmup_shapes) + len(self.lengths):
            raise ValueError("mqar_mixture_weights needs one weight per warm-up shape and per length")
        if len(self.needle_mixture_weights) != len(self.needle_warmup_lengths) + len(self.lengths):
            raise ValueError("needle_mixture_weights needs one weight per warm-up length and per length")

    @property
    def model_names(self) -> list[str]:
        return [f"{m}-{a}" for m in self.memories for a in self.aggregations] + [TRANSFORMER]

    def mqar_tasks(self) -> list[MQARConfig]:
        return [MQARConfig(self.vocab_size, n, p) for n, p in zip(self.lengths, self.pairs)]


QUICK = dict(aggregations=("none", "grm"), memories=("gla",), d_model=64, n_heads=2, mlp_hidden=128,
             lengths=(128, 256), pairs=(8, 16), warmup_shapes=((64, 4),), mqar_mixture_weights=(2, 1, 1),
             mqar_steps=60, needle_steps=20, needle_tokens_per_batch=1024, needle_warmup_lengths=(64,),
             needle_mixture_weights=(2, 1, 1),
             depths=(0.0, 1.0), needle_per_cell=2, tokens_per_batch=1024, eval_batches=1)


# Aggregations whose training is the very same computation as another's: for matrix memories the
# soup's read-out (sum_j g_j M_j)^T q is grm's sum_j g_j M_j^T q, and the chunked training path
# computes both the same way (docs/design.md section 1; test_model_identities proves it). So the grid
# trains grm once and scores those weights as soup too, through soup's own read-out.
TRAINS_AS = {"soup": "grm"}


@dataclass(frozen=True)
class Run:
    task: str          # "mqar" or "needle"
    model: str         # "gla-grm", ..., "transformer"
    lr: float
    seed: int
    grid: GridConfig = field(repr=False)
    twins: tuple[str, ...] = ()  # models scored with this run's trained weights (TRAINS_AS)

    def key_of(self, model: str) -> str:
        return f"{self.task}/{model}/lr={self.lr:g}/seed={self.seed}"

    @property
    def key(self) -> str:
        return self.key_of(self.model)

    @property
    def keys(self) -> list[str]:
        """The keys of every record this run writes."""
        return [self.key_of(m) for m in (self.model, *self.twins)]


def build_model(name: str, vocab_size: int, grid: GridConfig) -> nn.Module:
    if name == TRANSFORMER:
        return Transformer(TransformerConfig(vocab_size=vocab_size, d_model=grid.d_model, n_layers=grid.n_layers,
                                             n_heads=grid.n_heads, mlp_hidden=grid.mlp_hidden))
    memory, aggregation = name.split("-")
    head_dim = grid.d_model // grid.n_heads
    return MCModel(ModelConfig(vocab_size=vocab_size, d_model=grid.d_model, n_layers=grid.n_layers,
                               n_heads=grid.n_heads, dk=head_dim, dv=head_dim, mlp_hidden=grid.mlp_hidden,
                               memory=memory, aggregation=aggregation, segment_size=grid.segment_size))


def state_bytes(model: nn.Module) -> dict:
    """Inference memory in fp32: the fixed part, and what each further token of context adds
    (a KV cache for the transformer; one checkpoint per segment for MC, amortised per token)."""
    if isinstance(model, Transformer):
        return {"fixed_state_bytes": model.fixed_state_bytes(), "bytes_per_token": model.state_bytes_per_token()}
    c = model.config
    empty = model.new_state(1)
    one_segment = model.new_state(1)
    with torch.no_grad():
        model.prefill(torch.zeros(1, c.segment_size, dtype=torch.long), one_segment)
    # `none` keeps its checkpoints only as restart points (prefix reuse); reading needs none of them.
    per_checkpoint = 0 if c.aggregation == "none" else one_segment.nbytes() - empty.nbytes()
    return {"fixed_state_bytes": empty.nbytes(), "bytes_per_token": per_checkpoint / c.segment_size}


def execute(run: Run) -> list[dict]:
    """Train one model on one task and score it and its twins (runs in a worker process)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(run.seed)
    steps = run.grid.mqar_steps if run.task == "mqar" else run.grid.needle_steps
    train_cfg = TaskTrainConfig(steps=steps, lr=run.lr, seed=run.seed, warmup=min(100, steps // 10))
    task = grid_task(run.task, run.grid)
    model = build_model(run.model, task.vocab_size, run.grid)
    trained = train_on_task(model, task.mixture(), train_cfg, device)
    training = {"task": run.task, "lr": run.lr, "seed": run.seed, "steps": steps, "final_loss": trained.final_loss,
                "loss_curve": _loss_curve(trained.losses), "train_seconds": round(trained.seconds, 1),
                "device": device.type}
    records = []
    for name in (run.model, *run.twins):
        scored = model if name == run.model else _twin(model, name, task.vocab_size, run.grid).to(device)
        records.append({"key": run.key_of(name), "model": name, **training, **task.scores(scored, device),
                        **({"trained_as": run.model} if name != run.model else {}),
                        "parameters": sum(p.numel() for p in scored.parameters()),
                        **state_bytes(scored.cpu())})
    return records


def _twin(trained: nn.Module, name: str, vocab_size: int, grid: GridConfig) -> nn.Module:
    """Model `name` with `trained`'s weights (its TRAINS_AS partner)."""
    twin = build_model(name, vocab_size, grid)
    twin.load_state_dict(trained.state_dict())
    return twin.eval()


def _loss_curve(losses: list[float], points: int = 10) -> list[float]:
    """Mean training loss over `points` equal spans of the run: stuck, still falling, or done."""
    span = max(1, len(losses) // points)
    return [round(mean(losses[i:i + span]), 4) for i in range(0, span * points, span) if losses[i:i + span]]


def plan(grid: GridConfig, tasks: tuple[str, ...], models: tuple[str, ...] | None = None) -> list[Run]:
    """Every run of the grid (or of the named models only), longest first, so that the last
    runs to finish are short ones and no core idles long at the end. A model whose TRAINS_AS
    partner is also run is a twin of the partner's run rather than a run of its own; a twin of
    the grid costs no training, so a run scores it even when `models` does not name it."""
    lrs = {"mqar": grid.lrs, "needle": grid.needle_lrs}
    names = [name for name in grid.model_names if models is None or name in models]
    partner = {name: _trains_as(name) for name in grid.model_names}
    twins = {name: tuple(n for n in grid.model_names if n != name and partner[n] == name) for name in names}
    trained = [name for name in names if partner[name] not in names or partner[name] == name]
    runs = [Run(task, name, lr, seed, grid, twins[name]) for task in tasks for name in trained
            for lr in lrs[task] for seed in grid.seeds]
    return sorted(runs, key=_expected_cost, reverse=True)  # a stable sort: ties keep the grid's order


def _trains_as(name: str) -> str:
    memory, _, aggregation = name.partition("-")
    return f"{memory}-{TRAINS_AS[aggregation]}" if aggregation in TRAINS_AS else name


def _expected_cost(run: Run) -> float:
    """Training steps, weighted by the memory's measured cost per step (the delta rule's
    triangular solves make its steps ~1.35x those of gla or the transformer on this CPU)."""
    steps = run.grid.mqar_steps if run.task == "mqar" else run.grid.needle_steps
    return steps * (1.35 if run.model.startswith("delta-") else 1.0)


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def run_grid(grid: GridConfig, out: Path, tasks: tuple[str, ...], jobs: int, log=print,
             models: tuple[str, ...] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    results = out / "runs.jsonl"
    (out / "grid.json").write_text(json.dumps(dataclasses.asdict(grid), indent=2))
    finished = done_keys(results)
    todo = [run for run in plan(grid, tasks, models) if set(run.keys) - finished]
    log(f"{len(todo)} runs to do ({len(finished)} records already in {results}), {jobs} at a time")
    started = time.perf_counter()
    for i, records in enumerate(_execute_all(todo, jobs), 1):
        for record in records:
            if record["key"] in finished:  # a twin recorded by an earlier, interrupted grid
                continue
            with open(results, "a") as f:
                f.write(json.dumps(record) + "\n")
            accs = " ".join(f"{n}:{a:.2f}" for n, a in record["accuracy"].items())
            log(f"[{i}/{len(todo)} {time.perf_counter() - started:.0f}s] {record['key']}: {accs} "
                f"({record['train_seconds']:.0f}s)")
    log(f"grid done in {(time.perf_counter() - started) / 60:.1f} min")
    return results


def _execute_all(runs: list[Run], jobs: int):
    """Records as runs finish: in worker processes, or here one by one with --jobs 1."""
    if jobs == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a worker: timings comparable to a grid's
        try:
            yield from map(execute, runs)
        finally:
            torch.set_num_threads(threads)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    # One thread per worker: the grid runs one model per core.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        for future in as_completed([pool.submit(execute, run) for run in runs]):
            yield future.result()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evals.recall", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/recall", help="directory for runs.jsonl (default runs/recall)")
    parser.add_argument("--tasks", default="mqar,needle", help="comma list of mqar, needle")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one CPU thread each")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for a smoke test")
    parser.add_argument("--models", help="comma list of the grid's models to run (default all), "
                        "e.g. gla-none,gla-grm,transformer (a grm run also scores its soup twin)")
    parser.add_argument("--mqar-steps", type=int)
    parser.add_argument("--needle-steps", type=int)
    parser.add_argument("--seeds", type=int, help="number of seeds (default 1: seed 0)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first seed (default 0); --seeds 2 --first-seed 3 runs seeds 3 and 4")
    parser.add_argument("--lrs", help="comma list of MQAR learning rates to sweep (default 3e-3)")
    parser.add_argument("--needle-lrs", help="comma list of needle learning rates (default 3e-3)")
    parser.add_argument("--report", default="docs/recall.md", help="markdown file whose table is rewritten "
                        "('' to skip)")
    args = parser.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if not tasks or set(tasks) - {"mqar", "needle"}:
        parser.error(f"--tasks must be a comma list of mqar, needle; got {args.tasks!r}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    overrides = dict(QUICK) if args.quick else {}
    for name in ("mqar_steps", "needle_steps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    if args.seeds is not None or args.first_seed:
        n_seeds = 1 if args.seeds is None else args.seeds
        overrides["seeds"] = tuple(range(args.first_seed, args.first_seed + n_seeds))
    for option, name in (("--lrs", "lrs"), ("--needle-lrs", "needle_lrs")):
        value = getattr(args, name)
        if value is not None:
            try:
                overrides[name] = tuple(float(x) for x in value.split(","))
            except ValueError:
                parser.error(f"{option} must be a comma list of numbers, got {value!r}")
    try:
        grid = GridConfig(**overrides)
    except ValueError as e:
        parser.error(str(e))
    models = None
    if args.models is not None:
        models = tuple(m for m in args.models.split(",") if m)
        unknown = sorted(set(models) - set(grid.model_names))
        if not models or unknown:
            parser.error(f"--models must name models of the grid ({', '.join(grid.model_names)}); "
                         f"unknown: {', '.join(unknown) or args.models!r}")
    results = run_grid(grid, Path(args.out), tasks, args.jobs, models=models)
    if args.report:
        from evals.recall_report import write_report
        write_report(results, grid, Path(args.report))
        print(f"wrote {args.report}")


if __name__ == "__main__":
    main()

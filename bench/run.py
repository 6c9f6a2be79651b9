"""Side-by-side benchmarks of nncompress against peer tools, in one run; writes BENCHMARKS.md.

Usage: ``python bench/run.py --out BENCHMARKS.md`` (``make bench``).

Section 1 (foundation issue): magnitude connection pruning (Han et al. 2015) at several
sparsities with equal fine-tuning, nncompress vs ``torch.nn.utils.prune``
(``global_unstructured`` + L1, then ``prune.remove`` and ``torch.save``: what a user of it
gets on disk). Both start from the same trained model and fine-tune with the same loop,
schedule, learning rate and seed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

import nncompress as nc
from budget import BUDGET_INTRO, bench_budget, budget_markdown
from container import (
    CONTAINER_INTRO,
    bench_headers,
    bench_speed,
    headers_markdown,
    speed_markdown,
)
from dead_units import DEAD_UNITS_INTRO, bench_dead_units, dead_units_markdown
from fuzz import SECTIONS as FUZZ_SECTIONS
from generality import GENERALITY_INTRO, bench_generality, generality_markdown
from int8_ours import BUILDERS as INT8_OURS
from multiplex import bench_multiplex
from nncompress import models as zoo
from nncompress.data import Dataset
from nncompress.measure import accuracy, torch_save_bytes
from nncompress.measure.timing import latency_ab
from nncompress.recipe import Recipe, Stage
from nncompress.report import (
    environment,
    fmt_bytes,
    fmt_ms,
    fmt_pct,
    fmt_ratio,
    render_markdown,
)
from nncompress.train import fine_tune
from sharing import SHARING_INTRO, bench_sharing, sharing_markdown
from sparse_engine import bench_sparse_engine, sparse_engine_markdown
from structured import STRUCTURED_INTRO, bench_structured, structured_markdown
from tasks import bench_tasks

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
MODELS = (("mlp", "digits"), ("cnn1d", "mnist1d"))
STEPS = 5
EPOCHS_PER_STEP = 1
FINAL_EPOCHS = 6
LR = 3e-3
SEED = 0


@dataclass(frozen=True)
class PruneRow:
    model: str
    dataset: str
    tool: str
    sparsity: float
    accuracy: float
    accuracy_delta: float
    file_bytes: int
    ratio: float
    latency_b1_ms: float


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def run_torch_prune(model: nn.Module, data: Dataset, sparsity: float) -> tuple[nn.Module, int]:
    """torch.nn.utils.prune with the same iterative schedule; returns (model, torch.save bytes)."""
    m = copy.deepcopy(model)
    params = _prunable(m)
    done = 0.0
    for k in range(1, STEPS + 1):
        target = sparsity * k / STEPS
        amount = 1 - (1 - target) / (1 - done)  # torch's amount applies to what is left
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        fine_tune(m, data, epochs=EPOCHS_PER_STEP, lr=LR, seed=SEED, progress=False)
        done = target
    fine_tune(m, data, epochs=FINAL_EPOCHS, lr=LR, seed=SEED, progress=False)
    for module, name in params:
        prune.remove(module, name)
    return m, torch_save_bytes(m)


def run_ours(model: nn.Module, data: Dataset, sparsity: float, tmp: Path) -> tuple[nn.Module, int]:
    """nncompress magnitude pruning; returns (the model nc.load gives back, .nnc file bytes)."""
    recipe = Recipe("bench-magnitude", (Stage.technique(
        "magnitude_prune", sparsity=sparsity, scope="global", steps=STEPS,
        epochs_per_step=EPOCHS_PER_STEP, lr=LR),
        Stage.fine_tune(epochs=FINAL_EPOCHS, lr=LR)))
    result = nc.compress(model, recipe, data, seed=SEED, progress=False,
                         measure_latency=False)
    path = tmp / f"ours-{sparsity}.nnc"
    nc.save(result.model, path)
    return nc.load(path), path.stat().st_size


def bench_pruning(tmp: Path, echo) -> list[PruneRow]:
    rows: list[PruneRow] = []
    for name, dataset in MODELS:
        model, data = zoo.load(name, dataset, seed=SEED, progress=False)
        base_acc = accuracy(model, data.test)
        base_bytes = torch_save_bytes(model)
        found = [("baseline fp32 (torch.save)", 0.0, model, base_bytes)]
        for s in SPARSITIES:
            runners = (("nncompress", lambda m, d, s=s: run_ours(m, d, s, tmp)),
                       ("torch.nn.utils.prune", lambda m, d, s=s: run_torch_prune(m, d, s)))
            for tool, runner in runners:
                echo(f"  {name} {tool} sparsity {s:.0%}")
                pruned, nbytes = runner(model, data)
                found.append((tool, s, pruned, nbytes))
        echo(f"  {name}: batch-1 latency of every row, interleaved")
        lats = _lat_b1([m for _, _, m, _ in found], data)
        for (tool, s, m, nbytes), lat in zip(found, lats, strict=True):
            acc = accuracy(m, data.test)
            rows.append(PruneRow(name, dataset, tool, s, acc, acc - base_acc, nbytes,
                                 base_bytes / nbytes, lat))
    return rows


def _lat_b1(models: list[nn.Module], data: Dataset) -> list[float]:
    """Batch-1 medians of ``models`` timed interleaved (alternating rounds)."""
    reports = latency_ab(models, data.input_shape, batch_sizes=(1,), warmup=10,
                         repeats=50, rounds=10)
    return [r.results[0].median_ms for r in reports]


def pruning_markdown(rows: list[PruneRow]) -> str:
    headers = ["model", "data", "tool", "sparsity", "accuracy", "Δ accuracy", "bytes on disk",
               "ratio vs fp32", "latency b1"]
    cells = [[r.model, r.dataset, r.tool, fmt_pct(r.sparsity), fmt_pct(r.accuracy),
              fmt_pct(r.accuracy_delta, signed=True), fmt_bytes(r.file_bytes),
              fmt_ratio(r.ratio), fmt_ms(r.latency_b1_ms)] for r in rows]
    return render_markdown(headers, cells)


def bench_bits(echo) -> list[str]:
    """The bits-precision sections (issue 9), each its own markdown block."""
    import binary
    import int8
    import int8_engine
    import int8_rnn
    import lowbit
    import mixed
    out = Path("bench_out")
    echo("int8: ours (PTQ, QAT) beside ONNX Runtime and PyTorch int8 on the seven models")
    parts = [int8.section(ours=INT8_OURS, echo=echo)]
    echo("int8: hidden-unit pruning + int8 on the GRU / LSTM")
    from int8_ours import pruned_rnn_section
    parts.append(pruned_rnn_section())
    echo("int8: the C engine vs the integer reference and fp32")
    parts.append("## int8 C engine\n\n" + int8_engine.section())
    echo("int8 GRU / LSTM: gate nonlinearities")
    parts.append(int8_rnn.section(echo=echo))
    echo("low-bit: 2/3/4 bits, linear vs log; deep compression + low-bit")
    parts.append(lowbit.section(out_dir=out))
    echo("mixed precision vs uniform bits at equal bytes")
    parts.append(mixed.section(out_dir=Path("bench/figures")))   # tracked: BENCHMARKS.md links it
    echo("binarization: BNN / XNOR-Net and the XNOR-popcount kernel")
    parts.append(binary.section(out_dir=out, echo=echo))
    return [block for part in parts for block in (part, "")]


def bench_deploy(echo) -> str:
    """The deployment section (issue 10): bench/deploy.py."""
    import deploy
    return deploy.section(echo)


def bench_distill(echo) -> str:
    """The knowledge-distillation section (issue 11): bench/distill.py."""
    import distill
    return distill.section(echo)


#: sections ``--only`` can run alone: name -> (echo) -> markdown
ONLY = {"deploy": bench_deploy, "distill": bench_distill}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--only", choices=sorted(ONLY),
                        help="run one section and write just it to --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    env = environment()  # before any section changes the thread count
    torch.manual_seed(SEED)

    def echo(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.only:
        args.out.write_text(ONLY[args.only](echo) + "\n")
        echo(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        echo("magnitude pruning: nncompress vs torch.nn.utils.prune")
        prune_rows = bench_pruning(Path(tmp), echo)
    echo("structured pruning: nncompress vs torch-pruning")
    struct_rows = bench_structured(echo)
    echo("deep compression: bytes on disk vs peers")
    size_rows, breakdowns = bench_sharing(run_torch_prune, echo)
    echo("sparse inference engine")
    engine_rows = bench_sparse_engine(echo)
    echo("sharing across tasks: multi-task zipping, shared backbone")
    tasks = bench_tasks(echo)
    echo("multiplexing: confidence cascade, learned router")
    multiplex = bench_multiplex(echo)
    echo("dead-unit elimination after deep compression")
    dead_rows = bench_dead_units(echo)
    echo("accuracy budget on LeNet-300-100 from several seeds")
    budget_rows = bench_budget(echo)
    bits = bench_bits(echo)
    echo("deployment: the deployed form beside the peers (issue 10)")
    deployment = bench_deploy(echo)
    echo("knowledge distillation and label-free compression (issue 11)")
    distillation = bench_distill(echo)
    echo("every technique on every architecture")
    cells = bench_generality(echo)
    echo("container: save / load speed, header bytes")
    speed_rows, header_rows = bench_speed(echo), bench_headers(echo)
    echo("fuzzing: hostile files and recipes")
    fuzz = [f"### {title}\n\n{markdown(run(echo, 10_000, 0))}"
            for title, run, markdown in FUZZ_SECTIONS]
    text = "\n".join([
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`python bench/run.py`) in {time.perf_counter() - start:.0f} s "
        f"on torch {env['torch']}, {env['threads']} threads, {env['cpus']} CPUs "
        f"({env['machine']}).",
        "Sizes are bytes of the file each tool's user gets on disk; ratio = baseline fp32 "
        "`torch.save` bytes / that file's bytes. Latency: CPU median at batch 1 of the model "
        "the user gets back (ours: `nc.load` of the .nnc file), after warm-up; the rows a "
        "table compares are timed interleaved, in alternating rounds.",
        "",
        "## Magnitude connection pruning (Han et al. 2015) vs `torch.nn.utils.prune`",
        "",
        f"Global magnitude threshold over Linear/Conv weights, {STEPS} pruning steps with "
        f"{EPOCHS_PER_STEP} fine-tuning epoch(s) each, then {FINAL_EPOCHS} epochs of masked "
        f"fine-tuning (Adam, lr {LR}), same seed, same loop. "
        "torch.nn.utils.prune: `global_unstructured(L1Unstructured)`, `prune.remove`, "
        "`torch.save(state_dict)`. nncompress: `magnitude_prune`, `nc.save` (.nnc, sparse "
        "encoding chosen automatically).",
        "",
        pruning_markdown(prune_rows),
        "",
        "Unstructured sparsity does not make dense CPU kernels faster: both tools' batch-1 "
        "latencies stay at the dense model's. Speed comes from structured pruning (next "
        "section) and sparse kernels (the sparse-representation issue).",
        "",
        STRUCTURED_INTRO,
        "",
        structured_markdown(struct_rows),
        "",
        SHARING_INTRO,
        "",
        sharing_markdown(size_rows),
        "",
        "Per-stage bytes (Han et al. 2015, Table 1 style) of the deep-compression "
        "runs above: each weight tensor in its best plain lossless encoding after every "
        "stage (`CompressionResult.bytes_table()`), then with Huffman coding allowed.",
        "",
        "\n\n".join(breakdowns),
        "",
        "## Sparse inference engine (EIE idea, CSR kernels)",
        "",
        "`nncompress.kernels.sparsify(model, x)` times each pruned Linear / Conv dense and "
        "as CSR (Linear: `torch.addmv` at batch 1, `torch.sparse.mm` above; Conv: im2col "
        "then `torch.sparse.mm`) on its real input shape and keeps the faster one; outputs "
        "match the dense reference to float tolerance. Single layers use random weights "
        "pruned at random (no 28x28 MNIST here); the MLP rows are the trained digits MLP "
        "after `gradual-prune`. 1 thread.",
        "",
        sparse_engine_markdown(engine_rows),
        "",
        tasks,
        "",
        multiplex,
        "",
        DEAD_UNITS_INTRO,
        "",
        dead_units_markdown(dead_rows),
        "",
        BUDGET_INTRO,
        "",
        budget_markdown(budget_rows),
        "",
        *bits,
        deployment,
        "",
        distillation,
        "",
        GENERALITY_INTRO,
        "",
        generality_markdown(cells),
        "",
        CONTAINER_INTRO,
        "",
        speed_markdown(speed_rows),
        "",
        headers_markdown(header_rows),
        "",
        "## Fuzzing: hostile inputs give one-line errors",
        "",
        "10,000 seeded mutations each of saved `.nnc` files (loaded in forked children with a "
        "time bound, peak memory read per case) and of the packaged recipes, plus the "
        "hostile cases of the issue (few-KB files declaring gigabytes; billion-laughs "
        "aliases, deep nesting, huge integers and texts in recipes).",
        "",
        "\n\n".join(fuzz),
        "",
    ])
    args.out.write_text(text)
    echo(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

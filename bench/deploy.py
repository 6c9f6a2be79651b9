"""Bench section: the deployed form (issue 10) -- what a user runs, beside the peers.

For every (reference model, demo recipe) pair of :data:`nncompress.demo.DEMO_PLAN`, and
every reference model uncompressed, the compressed model is exported the ways a user
deploys it -- ONNX always (``nncompress.export.export``), dependency-free C when it holds
an integer program (Jacob et al. 2018; a binarized model, Courbariaux/Hubara et al. 2016,
is converted with ``quantize_int8`` first: its +-1 weights stay 1 bit) -- and each form is
run through ``nncompress.runtime.load(path).predict``. Those forms, eager PyTorch of the
compressed model (``nc.load`` of its ``.nnc``) and the peer artifacts of the
*uncompressed* model (ONNX Runtime fp32 / dynamic int8 / static QDQ int8, PyTorch dynamic
int8: :mod:`int8_peers`) are timed interleaved, per reference model, at batch 1 and 256
with 1 and 2 intra-op threads (:func:`int8.measure_artifacts`: the int8 section's rounds,
warm-ups and medians).

The issue's target: the deployed form's batch-1 latency is no slower than the fastest
peer artifact of equal or better test accuracy. Sections (b)-(d) -- structured pruning in
the deployed forms, generated C against ONNX Runtime, flash / RAM -- are in
:mod:`deploy_c`.

Usage: ``python bench/run.py --only deploy --out /tmp/deploy.md``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nncompress as nc
from c_loop import fmt_us
from int8 import Int8Row, measure_artifacts
from int8_peers import Artifact, peer_artifacts, torch_predict
from nncompress import models as zoo
from nncompress.data import Dataset, example_input
from nncompress.demo import DEMO_PLAN
from nncompress.recipe import Recipe
from nncompress.report import fmt_ms, fmt_pct, fmt_ratio, render_markdown
from nncompress.technique import Context, all_techniques
from peers import try_peer

__all__ = ["QUICK", "DeployRow", "Exported", "deploy_markdown", "export_forms", "int8_of",
           "quick_recipe", "section", "table_rows"]

SEED = 0
THREAD_COUNTS = (1, 2)
CALIB_BATCHES = 4          # x 64 seeded training samples for ORT's static quantizer
MODELS = ("mlp", "cnn1d", "cnn2d", "rescnn", "gru", "lstm", "transformer")
UNCOMPRESSED = "uncompressed"
#: recipe -> technique / fine_tune -> parameter overrides: the quick settings that keep
#: this section within ~6 minutes on 2 CPUs (the demo runs the recipes as written)
QUICK: dict[str, dict[str, dict[str, Any]]] = {
    "deep-compression": {"sparse_vd": {"epochs": 20}, "weight_sharing": {"epochs": 2}},
    "l1-filter-prune": {"l1_filter_prune": {"epochs_per_step": 6}},
    "low-rank": {"low_rank": {"epochs": 2}},
    "layer-prune": {"layer_prune": {"epochs": 3}},
    "lowbit": {"lowbit": {"epochs": 2}},
}
FORMS = ("torch", "onnx", "c")
FORM_LABELS = {"torch": "eager torch (.nnc)", "onnx": "ONNX Runtime (.onnx)",
               "c": "C int8 (ctypes)"}


def quick_recipe(name: str) -> Recipe:
    """The packaged recipe ``name`` with :data:`QUICK`'s overrides applied."""
    recipe = Recipe.named(name)
    changes = QUICK.get(name)
    if not changes:
        return recipe
    data = recipe.to_dict()
    for stage in data["stages"]:
        if "technique" in stage:
            stage["params"].update(changes.get(stage["technique"], {}))
        elif "fine_tune" in stage:
            stage["fine_tune"].update(changes.get("fine_tune", {}))
    return Recipe.from_dict(data)


def int8_of(model: nn.Module, data: Dataset) -> nn.Module:
    """``quantize_int8`` (minmax, 8 calibration batches) of a copy of ``model``."""
    tech = all_techniques().get("quantize_int8")
    torch.manual_seed(SEED)
    return tech.apply(copy.deepcopy(model), tech.config(),
                      Context(data=data, seed=SEED, progress=False))


@dataclass
class Exported:
    """One compressed model and its deployment files: ``nnc`` (eager), ``onnx`` and ``c``
    (a directory) where the export worked, else the reason in ``errors[form]``;
    ``c_result``: the C export's ExportResult (flash / RAM bytes)."""

    label: str
    model: nn.Module
    paths: dict[str, Path] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    c_result: Any = None
    c_model: nn.Module | None = None


def _holds_program(model: nn.Module) -> bool:
    from nncompress.export import program_of
    return program_of(model) is not None


def _c_source_model(model: nn.Module, data: Dataset) -> nn.Module | None:
    """The module the C export gets: the model when it holds an integer program, its
    ``quantize_int8`` conversion when it is binarized, else None (no C form)."""
    if _holds_program(model):
        return model
    if any("Binary" in type(m).__name__ for m in model.modules()):
        return int8_of(model, data)
    return None


def export_forms(label: str, model: nn.Module, data: Dataset, folder: Path, *,
                 c_source: nn.Module | None = None) -> Exported:
    """``model`` saved (.nnc), exported to ONNX and, where it applies, to C (``c_source``
    instead of ``model`` when given, e.g. its int8 conversion), under ``folder``;
    failures become reasons, never exceptions."""
    from nncompress.export import export

    folder.mkdir(parents=True, exist_ok=True)
    out = Exported(label, model)
    example = example_input(data, 4)
    nc.save(model, folder / "model.nnc")
    out.paths["torch"] = folder / "model.nnc"
    _, err = try_peer(lambda: export(model, folder / "model.onnx", example))
    if err is None:
        out.paths["onnx"] = folder / "model.onnx"
    else:
        out.errors["onnx"] = err
    source, err = ((c_source, None) if c_source is not None
                   else try_peer(lambda: _c_source_model(model, data)))
    if source is None:
        out.errors["c"] = err or "no integer program (a float model has no C form)"
        return out
    out.c_model = source
    result, err = try_peer(lambda: export(source, folder / "c", example, format="c"))
    if err is None:
        out.paths["c"], out.c_result = folder / "c", result
    else:
        out.errors["c"] = err
    return out


def form_artifacts(exp: Exported, threads: int) -> list[Artifact]:
    """The forms of ``exp`` as :class:`Artifact` s (kind ``"ours"``) for ``threads``;
    a form that fails to load is a failed artifact."""
    from nncompress import runtime

    arts = []
    for form in FORMS:
        name = f"{exp.label} | {form}"
        path = exp.paths.get(form)
        if path is None:
            arts.append(Artifact(name, None, 0, error=exp.errors.get(form)))
            continue
        if form == "torch":
            loaded = nc.load(path)
            arts.append(Artifact(name, torch_predict(loaded), path.stat().st_size))
            continue
        deployed, err = try_peer(lambda path=path: runtime.load(path, threads=threads))
        size = (sum(p.stat().st_size for p in path.iterdir()) if path.is_dir()
                else path.stat().st_size)
        arts.append(Artifact(name, None if deployed is None else deployed.predict, size,
                             error=err))
    return arts


@dataclass(frozen=True)
class DeployRow:
    """One (model, recipe) pair measured: per thread count, our forms' rows (``forms``:
    torch / onnx / c, failed ones with ``error``) and the uncompressed model's peers
    (``peers``). Accuracies are fractions, latencies ms per call."""

    model: str
    recipe: str
    forms: dict[int, dict[str, Int8Row]]
    peers: dict[int, tuple[Int8Row, ...]]

    def best(self, threads: int) -> tuple[str, Int8Row] | None:
        """Our fastest form at batch 1 (form name, row), or None when all failed."""
        live = [(f, r) for f, r in self.forms[threads].items() if r.b1_ms is not None]
        return min(live, key=lambda fr: fr[1].b1_ms or 0.0, default=None)

    @property
    def accuracy(self) -> float | None:
        best = self.best(THREAD_COUNTS[0])
        return None if best is None else best[1].accuracy

    def peer(self, threads: int, *, any_accuracy: bool = False) -> Int8Row | None:
        """The fastest peer artifact at batch 1 whose accuracy is >= ours (any accuracy
        with ``any_accuracy``)."""
        acc = self.accuracy
        live = [r for r in self.peers[threads] if r.b1_ms is not None and r.kind != "fp32"
                and (any_accuracy or acc is None or (r.accuracy or 0.0) >= acc - 1e-9)]
        return min(live, key=lambda r: r.b1_ms or 0.0, default=None)

    def ratio(self, threads: int, *, any_accuracy: bool = False) -> float | None:
        """Peer b1 / ours b1 (>= 1: the target is met)."""
        best, peer = self.best(threads), self.peer(threads, any_accuracy=any_accuracy)
        if best is None or peer is None or not best[1].b1_ms or peer.b1_ms is None:
            return None
        return peer.b1_ms / best[1].b1_ms

    @property
    def met(self) -> bool | None:
        """Met at every thread count (None: nothing to compare)."""
        ratios = [self.ratio(t) for t in THREAD_COUNTS]
        if any(r is None for r in ratios):
            return None if self.best(THREAD_COUNTS[0]) is not None else False
        return all(r >= 1.0 for r in ratios if r is not None)


def _compress(name: str, recipe: str, model: nn.Module, data: Dataset) -> nn.Module:
    result = nc.compress(model, quick_recipe(recipe), data, seed=SEED, progress=False,
                         measure_latency=False)
    return result.model.eval()


def table_rows(name: str, recipes: list[str], folder: Path, echo: Callable[[str], None],
               keep: dict[tuple[str, str], Exported] | None = None) -> list[DeployRow]:
    """Every recipe of ``recipes`` on reference model ``name`` (plus the uncompressed
    model), exported and timed interleaved with the uncompressed model's peers.
    ``keep`` collects the exports by (model, recipe) for the other sections."""
    model, data = zoo.load(name, seed=SEED, progress=False)
    model.eval()
    exports = [export_forms(UNCOMPRESSED, model, data, folder / name / "base")]
    for recipe in recipes:
        echo(f"  deploy: {name} / {recipe}")
        got, err = try_peer(lambda recipe=recipe: _compress(name, recipe, model, data))
        if got is None:
            exp = Exported(recipe, model, errors={f: f"compression failed: {err}"
                                                  for f in FORMS})
        else:
            exp = export_forms(recipe, got, data, folder / name / recipe)
        exports.append(exp)
    if keep is not None:
        keep.update({(name, e.label): e for e in exports})
    measured: dict[int, list[Int8Row]] = {}
    for threads in THREAD_COUNTS:
        echo(f"  deploy: {name} timing, {threads} thread(s)")
        peers = peer_artifacts(name, model, data, CALIB_BATCHES, seed=SEED, threads=threads)
        ours = [a for e in exports for a in form_artifacts(e, threads)]
        measured[threads] = measure_artifacts(peers + ours, data, threads=threads)
    rows = []
    for exp in exports:
        forms = {t: {r.name.split(" | ")[1]: r for r in measured[t]
                     if r.name.startswith(f"{exp.label} | ")} for t in THREAD_COUNTS}
        peers = {t: tuple(r for r in measured[t] if r.kind != "ours") for t in THREAD_COUNTS}
        rows.append(DeployRow(name, exp.label, forms, peers))
    return rows


def _pair(values: list[float | None], fmt: Callable[[float | None], str]) -> str:
    return " / ".join(fmt(v) for v in values)


def _forms_cell(row: DeployRow) -> str:
    names = [row.best(t) for t in THREAD_COUNTS]
    labels = [FORM_LABELS[b[0]] if b else "-" for b in names]
    return labels[0] if len(set(labels)) == 1 else " / ".join(labels)


def _eager(row: DeployRow, threads: int, batch: int) -> float | None:
    r = row.forms[threads].get("torch")
    return None if r is None else (r.b1_ms if batch == 1 else r.b256_ms)


def _best_ms(row: DeployRow, threads: int, batch: int) -> float | None:
    b = row.best(threads)
    return None if b is None else (b[1].b1_ms if batch == 1 else b[1].b256_ms)


def _peer_cell(row: DeployRow) -> str:
    names = []
    for t in THREAD_COUNTS:
        p = row.peer(t)
        names.append("none as accurate" if p is None else f"{p.name} ({fmt_pct(p.accuracy)})")
    return names[0] if len(set(names)) == 1 else " / ".join(names)


def _met_cell(row: DeployRow) -> str:
    if row.best(THREAD_COUNTS[0]) is None:
        return "NO (every form failed)"
    if row.met is None:
        return "yes (no peer as accurate)"
    return "yes" if row.met else "NO"


def deploy_markdown(rows: list[DeployRow]) -> str:
    """The table of part (a) and the notes on failed forms."""
    ts = "/".join(str(t) for t in THREAD_COUNTS)
    headers = ["model", "recipe", "accuracy", "deployed form (fastest of ours, b1)",
               f"b1 ({ts} thr)", f"b256 ({ts} thr)", f"eager b1 ({ts} thr)",
               f"eager b256 ({ts} thr)", "fastest peer of >= accuracy",
               f"peer b1 ({ts} thr)", f"ratio peer / ours ({ts} thr)",
               f"vs fastest peer of any accuracy ({ts} thr)", "target met"]
    cells = []
    for r in rows:
        cells.append([
            r.model, r.recipe, fmt_pct(r.accuracy), _forms_cell(r),
            _pair([_best_ms(r, t, 1) for t in THREAD_COUNTS], fmt_us),
            _pair([_best_ms(r, t, 256) for t in THREAD_COUNTS], fmt_ms),
            _pair([_eager(r, t, 1) for t in THREAD_COUNTS], fmt_us),
            _pair([_eager(r, t, 256) for t in THREAD_COUNTS], fmt_ms),
            _peer_cell(r),
            _pair([(p.b1_ms if p else None) for p in (r.peer(t) for t in THREAD_COUNTS)],
                  fmt_us),
            _pair([r.ratio(t) for t in THREAD_COUNTS], fmt_ratio),
            _pair([r.ratio(t, any_accuracy=True) for t in THREAD_COUNTS], fmt_ratio),
            _met_cell(r)])
    notes = sorted({f"- {r.model} / {r.recipe}, {form}: {row.error}"
                    for r in rows for t in THREAD_COUNTS
                    for form, row in r.forms[t].items() if row.error})
    return "\n".join([render_markdown(headers, cells), "",
                      *(["Forms that do not exist or failed:", "", *notes] if notes else [])])


def plan() -> dict[str, list[str]]:
    """Reference model -> the demo recipes shown on it (DEMO_PLAN inverted)."""
    out: dict[str, list[str]] = {name: [] for name in MODELS}
    for recipe, names in DEMO_PLAN.items():
        for name in names:
            out.setdefault(name, []).append(recipe)
    return out


def intro() -> str:
    quick = "; ".join(f"`{r}`: " + ", ".join(f"{t} {k}={v}" for t, ps in ch.items()
                                             for k, v in ps.items())
                      for r, ch in QUICK.items())
    ts = " and ".join(str(t) for t in THREAD_COUNTS)
    return f"""## Deployment: the deployed form beside the peers (issue 10)

Every (reference model, demo recipe) pair of the demo, and every reference model
uncompressed, compressed as the demo does (seed {SEED}; quick settings to keep this
section near 6 minutes on 2 CPUs -- {quick}; every other recipe as packaged), then
exported: ONNX always (`nc.export`, float ONNX through the TorchScript exporter, or exact
integer ONNX for int8 models), dependency-free C when the model holds an int8 program
(a binarized model is converted by `quantize_int8` first; its +-1 weights stay 1 bit).
Each form runs through `nncompress.runtime.load(path).predict` (ONNX Runtime session;
C compiled with gcc and called through ctypes); eager torch is `nc.load` of the `.nnc`.
Peers are artifacts of the *uncompressed* model (ORT fp32, ORT dynamic int8, ORT static
QDQ int8, PyTorch dynamic int8; built as in the int8 section). All artifacts of one
reference model are timed interleaved in alternating rounds (the int8 section's timing:
median ms per call of a real test batch, repeated to 256), with {ts} intra-op threads
(the cells give both, `1 thr / 2 thr`). Accuracy: top-1 on the test split of the form
shown. The deployed form is our fastest at batch 1 (eager torch counts as a form); the
peer is the fastest at batch 1 whose test accuracy is equal or better; ratio = peer b1 /
ours b1 (>= 1.00x: the target is met); target met = met at both thread counts."""


def part_a(root: Path, echo: Callable[[str], None],
           keep: dict[tuple[str, str], Exported] | None = None) -> str:
    """Part (a) as markdown (heading, method, table, verdict line, run time); files
    under ``root``."""
    start = time.perf_counter()
    rows: list[DeployRow] = []
    for name, recipes in plan().items():
        rows += table_rows(name, recipes, root, echo, keep)
    met = sum(1 for r in rows if r.met is not False)
    return "\n".join([intro(), "", deploy_markdown(rows), "",
                      f"Target met on {met} of {len(rows)} rows; part (a) run time "
                      f"{time.perf_counter() - start:.0f} s."])


def section(echo: Callable[[str], None]) -> str:
    """The whole deployment section: (a) here, (b)-(d) from :mod:`deploy_c`."""
    import deploy_c

    start = time.perf_counter()
    keep: dict[tuple[str, str], Exported] = {}
    with tempfile.TemporaryDirectory(prefix="nnc-deploy-") as tmp:
        root = Path(tmp)
        parts = [part_a(root / "a", echo, keep)]
        echo("deployment: structured pruning in the deployed forms")
        parts.append(deploy_c.structured_part(root / "b", echo))
        echo("deployment: generated C vs ONNX Runtime fp32; flash / RAM")
        parts += deploy_c.c_parts(root / "c", echo, keep)
    parts.append(f"Deployment section run time: {time.perf_counter() - start:.0f} s.")
    return "\n\n".join(parts)

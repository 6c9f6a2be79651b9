"""Bench section: the deployed form (issue 10) -- what a user runs, beside the peers.

For every (reference model, demo recipe) pair of :data:`nncompress.demo.DEMO_PLAN`, and
every reference model uncompressed, the compressed model is exported the ways a user
deploys it -- ONNX always (``nncompress.export.export``), dependency-free C when it holds
an integer program (Jacob et al. 2018; a binarized model, Courbariaux/Hubara et al. 2016,
is converted with ``quantize_int8`` first: its +-1 weights stay 1 bit); a model with no
integer program (a float recipe output, the uncompressed model) also gets its
``quantize_int8`` conversion made at deployment, as TFLite's converter quantizes a float
model, exported to C (or kept as its ``.nnc`` int8 engine where C refuses it) -- and
each form is run through ``nncompress.runtime.load(path).predict``. Those forms, eager
PyTorch of the compressed model (``nc.load`` of its ``.nnc``) and the peer artifacts of
the *uncompressed* model (ONNX Runtime fp32 / dynamic int8 / static QDQ int8, PyTorch
dynamic int8: :mod:`int8_peers`) are timed interleaved, per reference model, at batch 1
and 256 with 1 and 2 intra-op threads (:func:`int8.measure_artifacts`: the int8
section's rounds, warm-ups and medians).

The issue's target: the deployed form (our fastest form at batch 1) is no slower than
the fastest peer artifact whose test accuracy is equal or better than that form's.
Sections (b)-(d) -- structured pruning in the deployed forms, generated C against ONNX
Runtime, flash / RAM -- are in :mod:`deploy_c`; (c) and (d) reuse part (a)'s
conversions of the uncompressed models and (c) its timings.

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
from deploy_rows import FORMS, THREAD_COUNTS, DeployRow, deploy_markdown, findings
from int8 import Int8Row, measure_artifacts
from int8_peers import Artifact, peer_artifacts, torch_predict
from nncompress import models as zoo
from nncompress.data import Dataset, example_input
from nncompress.demo import DEMO_PLAN
from nncompress.recipe import Recipe
from nncompress.technique import Context, all_techniques
from peers import try_peer

__all__ = ["QUICK", "DeployRow", "Exported", "deploy_markdown", "export_forms", "int8_of",
           "quick_recipe", "section", "table_rows"]

SEED = 0
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
    """One compressed model and its deployment files by form (:data:`FORMS`): ``torch``
    (its .nnc), ``onnx``, ``c`` (a directory), and for a float model ``c8`` (its
    ``quantize_int8`` conversion as C) or ``e8`` (that conversion's .nnc, where C refuses
    it), where the export worked, else the reason in ``errors[form]``; ``c_result`` /
    ``c8_result``: the C exports' ExportResult (flash / RAM bytes); ``c_model`` /
    ``c8_model``: the modules exported to C (``c8_model``: the conversion, kept for the
    other parts)."""

    label: str
    model: nn.Module
    paths: dict[str, Path] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    c_result: Any = None
    c_model: nn.Module | None = None
    c8_result: Any = None
    c8_model: nn.Module | None = None

    @property
    def engine(self) -> bool:
        """The model is an Int8Model: its .nnc runs the generated-C engine."""
        from nncompress.quant.int8 import Int8Model
        return isinstance(self.model, Int8Model)


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
                 c_source: nn.Module | None = None, int8_too: bool = False) -> Exported:
    """``model`` saved (.nnc), exported to ONNX and, where it applies, to C (``c_source``
    instead of ``model`` when given, e.g. its int8 conversion), under ``folder``;
    ``int8_too``: a model with no C form gets its ``quantize_int8`` conversion exported
    as form ``"c8"`` (its .nnc as ``"e8"`` where C refuses it). Failures become
    reasons, never exceptions."""
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
        if int8_too:
            _export_c8(out, model, data, folder / "c8", example)
        return out
    out.c_model = source
    result, err = try_peer(lambda: export(source, folder / "c", example, format="c"))
    if err is None:
        out.paths["c"], out.c_result = folder / "c", result
    else:
        out.errors["c"] = err
    return out


def _export_c8(out: Exported, model: nn.Module, data: Dataset, folder: Path,
               example: Any) -> None:
    """``model``'s quantize_int8 conversion made at deployment, exported to C under
    ``folder`` (form ``c8``); where the C export refuses it, the conversion's .nnc
    (form ``e8``: an Int8Model runs its own generated-C engine)."""
    from nncompress.export import export
    from nncompress.quant.int8 import Int8Model

    q, err = try_peer(lambda: int8_of(model, data))
    if q is None:
        out.errors["c8"] = f"quantize_int8 failed: {err}"
        return
    out.c8_model = q
    result, err = try_peer(lambda: export(q, folder, example, format="c"))
    if err is None:
        out.paths["c8"], out.c8_result = folder, result
        return
    out.errors["c8"] = err
    if isinstance(q, Int8Model):
        nc.save(q, folder.parent / "int8.nnc")
        out.paths["e8"] = folder.parent / "int8.nnc"


def form_artifacts(exp: Exported, threads: int) -> list[Artifact]:
    """The forms of ``exp`` as :class:`Artifact` s (kind ``"ours"``) for ``threads``;
    a form that fails to load is a failed artifact."""
    from nncompress import runtime

    arts = []
    for form in FORMS:
        name = f"{exp.label} | {form}"
        path = exp.paths.get(form)
        if path is None and form not in exp.errors and form not in ("torch", "onnx", "c"):
            continue
        if path is None:
            arts.append(Artifact(name, None, 0, error=exp.errors.get(form)))
            continue
        if form in ("torch", "e8"):
            loaded = nc.load(path)
            arts.append(Artifact(name, torch_predict(loaded), path.stat().st_size))
            continue
        deployed, err = try_peer(lambda path=path: runtime.load(path, threads=threads))
        size = (sum(p.stat().st_size for p in path.iterdir()) if path.is_dir()
                else path.stat().st_size)
        arts.append(Artifact(name, None if deployed is None else deployed.predict, size,
                             error=err))
    return arts


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
    exports = [export_forms(UNCOMPRESSED, model, data, folder / name / "base",
                            int8_too=True)]
    for recipe in recipes:
        echo(f"  deploy: {name} / {recipe}")
        got, err = try_peer(lambda recipe=recipe: _compress(name, recipe, model, data))
        if got is None:
            exp = Exported(recipe, model, errors={f: f"compression failed: {err}"
                                                  for f in FORMS})
        else:
            exp = export_forms(recipe, got, data, folder / name / recipe, int8_too=True)
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
        rows.append(DeployRow(name, exp.label, forms, peers, engine=exp.engine))
    return rows


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

### (a) The deployed form of every demo row against the peers of equal or better accuracy

Every (reference model, demo recipe) pair of the demo, and every reference model
uncompressed, compressed as the demo does (seed {SEED}; quick settings to keep this
section to a few minutes on 2 CPUs -- {quick}; every other recipe as packaged). Our
candidate forms of a row, each run through `nncompress.runtime.load(path).predict`
except eager torch (`nc.load` of the `.nnc`):

- the recipe's model as eager torch (an int8 model's `.nnc` is its *int8 engine*:
  `Int8Model`, whose kernels are generated C), as ONNX (`nc.export`: float ONNX through
  the TorchScript exporter, exact integer ONNX for int8 models) in ONNX Runtime, and as
  dependency-free C (gcc, ctypes) when it holds an int8 program (a binarized model is
  converted by `quantize_int8` first; its +-1 weights stay 1 bit);
- for a model that holds no int8 program (a float recipe output, or the uncompressed
  model): *`quantize_int8` at deployment* -- the model converted as TFLite's converter
  quantizes a float model (minmax, per-channel weights, 8 training batches of
  calibration, as in the int8 section; no fine-tuning) and exported to C; where the C
  export refuses the converted program (the transformer's LayerNorm / softmax stay
  float), the conversion's own `.nnc` (its int8 engine). Its test accuracy is measured
  like every other form's.

Peers are artifacts of the *uncompressed* model (ORT fp32, ORT dynamic int8, ORT static
QDQ int8, PyTorch dynamic int8; built as in the int8 section). All artifacts of one
reference model, ours and the peers, are timed interleaved in alternating rounds (the
int8 section's timing: median ms per call of a real test batch, repeated to 256), with
{ts} intra-op threads (the cells give both, `1 thr / 2 thr`). Accuracy: top-1 on the
test split. The deployed form is our fastest form at batch 1 (all the forms above are
candidates) and the accuracy column is *that form's*; the peer is the fastest peer at
batch 1 whose test accuracy is equal or better than that form's; ratio = peer b1 / ours
b1 (>= 1.00x: the target is met); target met = met at both thread counts. The recipe's
own model in ONNX Runtime (float ONNX; exact integer ONNX for an int8 recipe) stays
visible in its own column (accuracy; b1)."""


def part_a(root: Path, echo: Callable[[str], None],
           keep: dict[tuple[str, str], Exported] | None = None
           ) -> tuple[str, list[DeployRow]]:
    """Part (a) as markdown (heading, method, table, verdict line, run time) and its
    rows; files under ``root``."""
    start = time.perf_counter()
    rows: list[DeployRow] = []
    for name, recipes in plan().items():
        rows += table_rows(name, recipes, root, echo, keep)
    met = sum(1 for r in rows if r.met is not False)
    text = "\n".join([intro(), "", deploy_markdown(rows), "",
                      f"Target met on {met} of {len(rows)} rows. {findings(rows)}", "",
                      f"Part (a) run time {time.perf_counter() - start:.0f} s."])
    return text, rows


def section(echo: Callable[[str], None]) -> str:
    """The whole deployment section: (a) here, (b)-(d) from :mod:`deploy_c`."""
    import deploy_c

    start = time.perf_counter()
    keep: dict[tuple[str, str], Exported] = {}
    with tempfile.TemporaryDirectory(prefix="nnc-deploy-") as tmp:
        root = Path(tmp)
        text, rows = part_a(root / "a", echo, keep)
        parts = [text]
        echo("deployment: structured pruning in the deployed forms")
        parts.append(deploy_c.structured_part(root / "b", echo))
        echo("deployment: generated C vs ONNX Runtime fp32; flash / RAM")
        parts += deploy_c.c_parts(root / "c", echo, keep, rows)
    parts.append(f"Deployment section run time: {time.perf_counter() - start:.0f} s.")
    return "\n\n".join(parts)

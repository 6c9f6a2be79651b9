"""The rows and tables of the deployment section's part (a) (``bench/deploy.py``): a
(model, recipe) pair's deployed forms and the uncompressed model's peers, measured at
each thread count, and the verdict against issue 10's target (the deployed form's
batch-1 latency no slower than the fastest peer artifact of equal or better accuracy).

A float model's forms include its ``quantize_int8`` conversion (Jacob et al. 2018)
made at deployment, as TFLite's converter quantizes a float model: exported to C
(``"c8"``), or, where the C export refuses the program (float LayerNorm / softmax), the
converted model's own ``.nnc`` (``"e8"``: an :class:`~nncompress.quant.int8.Int8Model`,
whose engine is generated C too)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from c_loop import fmt_us
from int8 import Int8Row
from nncompress.report import fmt_ms, fmt_pct, fmt_ratio, render_markdown

__all__ = ["FORMS", "FORM_LABELS", "THREAD_COUNTS", "DeployRow", "deploy_markdown",
           "findings"]

THREAD_COUNTS = (1, 2)

#: every candidate form of a row: the recipe's model as eager torch / ONNX / C (when it
#: holds an integer program), and a float model's quantize_int8 conversion made at
#: deployment as C ("c8") or, where C refuses it, as its int8 engine (.nnc, "e8")
FORMS = ("torch", "onnx", "c", "c8", "e8")
AT_DEPLOYMENT = ("c8", "e8")
FORM_LABELS = {"torch": "eager torch (.nnc)", "onnx": "ONNX Runtime (.onnx)",
               "c": "C int8 (ctypes)",
               "c8": "C int8 (quantize_int8 at deployment, ctypes)",
               "e8": "int8 engine (quantize_int8 at deployment, .nnc)"}
#: the torch form's label when the recipe's model is an Int8Model (its engine is C)
ENGINE_LABEL = "int8 engine (.nnc)"


@dataclass(frozen=True)
class DeployRow:
    """One (model, recipe) pair measured: per thread count, our forms' rows (``forms``:
    :data:`FORMS`, failed ones with ``error``) and the uncompressed model's peers
    (``peers``); ``engine``: the recipe's model is an Int8Model (its ``.nnc`` runs the
    generated-C engine). Accuracies are fractions, latencies ms per call."""

    model: str
    recipe: str
    forms: dict[int, dict[str, Int8Row]]
    peers: dict[int, tuple[Int8Row, ...]]
    engine: bool = False

    def label(self, form: str) -> str:
        """The display name of ``form`` on this row."""
        return ENGINE_LABEL if form == "torch" and self.engine else FORM_LABELS[form]

    def best(self, threads: int) -> tuple[str, Int8Row] | None:
        """Our fastest form at batch 1 among those whose accuracy is known (form name,
        row), or None when all failed."""
        live = [(f, r) for f, r in self.forms[threads].items()
                if r.b1_ms is not None and r.accuracy is not None]
        return min(live, key=lambda fr: fr[1].b1_ms or 0.0, default=None)

    def accuracy(self, threads: int) -> float | None:
        """Test accuracy of the deployed form at ``threads``."""
        best = self.best(threads)
        return None if best is None else best[1].accuracy

    def peer(self, threads: int, *, any_accuracy: bool = False) -> Int8Row | None:
        """The fastest peer artifact at batch 1 whose accuracy is >= the deployed
        form's (any accuracy with ``any_accuracy``)."""
        acc = self.accuracy(threads)
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


def _pair(values: list[float | None], fmt: Callable[[float | None], str]) -> str:
    return " / ".join(fmt(v) for v in values)


def _one_or_pair(values: list[str]) -> str:
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def _forms_cell(row: DeployRow) -> str:
    return _one_or_pair([row.label(b[0]) if b else "-"
                         for b in (row.best(t) for t in THREAD_COUNTS)])


def _form_ms(row: DeployRow, form: str, threads: int, batch: int) -> float | None:
    r = row.forms[threads].get(form)
    return None if r is None else (r.b1_ms if batch == 1 else r.b256_ms)


def _best_ms(row: DeployRow, threads: int, batch: int) -> float | None:
    b = row.best(threads)
    return None if b is None else (b[1].b1_ms if batch == 1 else b[1].b256_ms)


def _onnx_cell(row: DeployRow) -> str:
    """The recipe's own model in ONNX Runtime: accuracy; b1 at each thread count."""
    first = row.forms[THREAD_COUNTS[0]].get("onnx")
    if first is None or first.b1_ms is None:
        return "-"
    return (f"{fmt_pct(first.accuracy)}; "
            + _pair([_form_ms(row, "onnx", t, 1) for t in THREAD_COUNTS], fmt_us))


def _peer_cell(row: DeployRow) -> str:
    names = []
    for t in THREAD_COUNTS:
        p = row.peer(t)
        names.append("none as accurate" if p is None else f"{p.name} ({fmt_pct(p.accuracy)})")
    return _one_or_pair(names)


def _met_cell(row: DeployRow) -> str:
    if row.best(THREAD_COUNTS[0]) is None:
        return "NO (every form failed)"
    if row.met is None:
        return "yes (no peer as accurate)"
    return "yes" if row.met else "NO"


def _cells(r: DeployRow) -> list[str]:
    return [
        r.model, r.recipe, _forms_cell(r),
        _one_or_pair([fmt_pct(r.accuracy(t)) for t in THREAD_COUNTS]),
        _pair([_best_ms(r, t, 1) for t in THREAD_COUNTS], fmt_us),
        _pair([_best_ms(r, t, 256) for t in THREAD_COUNTS], fmt_ms),
        _onnx_cell(r),
        _pair([_form_ms(r, "torch", t, 1) for t in THREAD_COUNTS], fmt_us),
        _pair([_form_ms(r, "torch", t, 256) for t in THREAD_COUNTS], fmt_ms),
        _peer_cell(r),
        _pair([(p.b1_ms if p else None) for p in (r.peer(t) for t in THREAD_COUNTS)],
              fmt_us),
        _pair([r.ratio(t) for t in THREAD_COUNTS], fmt_ratio),
        _pair([r.ratio(t, any_accuracy=True) for t in THREAD_COUNTS], fmt_ratio),
        _met_cell(r)]


_NO_PROGRAM = "no integer program"


def _failures(rows: list[DeployRow]) -> list[str]:
    """One line per reason: the forms that failed or do not exist, and where. A float
    model's own "no C form" is left out where its at-deployment conversion was tried."""
    where: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        forms = r.forms[THREAD_COUNTS[0]]
        tried = any(f in forms for f in AT_DEPLOYMENT)
        for form, row in forms.items():
            if not row.error or (form == "c" and tried and _NO_PROGRAM in row.error):
                continue
            where[f"{r.label(form)}: {row.error}"].append(f"{r.model} / {r.recipe}")
    return [f"- {why}: {', '.join(pairs)}" for why, pairs in sorted(where.items())]


def deploy_markdown(rows: list[DeployRow]) -> str:
    """The table of part (a) and the notes on failed forms."""
    ts = "/".join(str(t) for t in THREAD_COUNTS)
    headers = ["model", "recipe", "deployed form (fastest of ours at b1)",
               "accuracy (deployed form)", f"b1 ({ts} thr)", f"b256 ({ts} thr)",
               f"ONNX of the recipe's model: accuracy; b1 ({ts} thr)",
               f"eager b1 ({ts} thr)", f"eager b256 ({ts} thr)",
               "fastest peer of >= accuracy", f"peer b1 ({ts} thr)",
               f"ratio peer / ours ({ts} thr)",
               f"vs fastest peer of any accuracy ({ts} thr)", "target met"]
    notes = _failures(rows)
    return "\n".join([render_markdown(headers, [_cells(r) for r in rows]), "",
                      *(["Forms that do not exist or failed:", "", *notes] if notes else [])])


def _same_graph_overhead(rows: list[DeployRow], threads: int) -> list[tuple[str, float]]:
    """Per reference model: our ONNX of the uncompressed model (through
    ``runtime.load``) vs the peer's ORT fp32 session on the same graph, b1 ms ratio."""
    out = []
    for r in rows:
        ours = r.forms[threads].get("onnx")
        peer = next((p for p in r.peers[threads] if p.kind == "ort-fp32"), None)
        if r.recipe == "uncompressed" and ours and peer and ours.b1_ms and peer.b1_ms:
            out.append((r.model, ours.b1_ms / peer.b1_ms))
    return out


def _missed(r: DeployRow) -> str:
    """A missed row in a few words: deployed form, ratios and, for a float form, whether
    the at-deployment conversion failed."""
    t = THREAD_COUNTS[0]
    form = (r.best(t) or ("-", None))[0]
    why = ""
    if form in ("onnx", "torch") and not r.engine:
        c8 = [r.forms[t][f] for f in AT_DEPLOYMENT if f in r.forms[t]]
        why = ("; quantize_int8 at deployment failed" if c8 and all(x.b1_ms is None for x in c8)
               else "; its int8 form was slower" if c8 else "")
    ratios = _pair([r.ratio(x) for x in THREAD_COUNTS], fmt_ratio)
    return f"{r.model} / {r.recipe} ({r.label(form) if form != '-' else form}, {ratios}{why})"


def findings(rows: list[DeployRow]) -> str:
    """Which forms were deployed and why the target is missed where it is, from this
    run's figures."""
    t = THREAD_COUNTS[0]
    chosen = [(r.best(t) or ("-", None))[0] for r in rows]
    floats = [r for r in rows if any(f in r.forms[t] for f in AT_DEPLOYMENT)]
    converted = sum(1 for f in chosen if f in AT_DEPLOYMENT)
    missed = [r for r in rows if r.met is False]
    parts = [f"The float models' quantize_int8 conversion at deployment is the deployed "
             f"form on {converted} of the {len(floats)} rows that hold a float model "
             f"(C on {chosen.count('c8')}, the int8 engine on {chosen.count('e8')})."]
    if missed:
        parts.append(f"Missed on {len(missed)} row{'s' if len(missed) > 1 else ''}: "
                     + "; ".join(_missed(r) for r in missed) + ".")
    same = _same_graph_overhead(rows, t)
    if same:
        lo, hi = min(x for _, x in same), max(x for _, x in same)
        parts.append(f"On the uncompressed models our float ONNX (through "
                     f"`runtime.load(...).predict`) and the peer's ORT fp32 session run the "
                     f"same graph; ours takes {lo:.2f}-{hi:.2f}x the peer's batch-1 time at "
                     f"{t} thread ({', '.join(f'{m} {x:.2f}x' for m, x in same)}): above 1, "
                     "the `predict` wrapper's per-call cost; below 1, timing noise.")
    return " ".join(parts)

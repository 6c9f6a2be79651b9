"""The rows and tables of the deployment section's part (a) (``bench/deploy.py``): a
(model, recipe) pair's deployed forms and the uncompressed model's peers, measured at
each thread count, and the verdict against issue 10's target (the deployed form's
batch-1 latency no slower than the fastest peer artifact of equal or better accuracy)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from c_loop import fmt_us
from int8 import Int8Row
from nncompress.report import fmt_ms, fmt_pct, fmt_ratio, render_markdown

__all__ = ["FORMS", "FORM_LABELS", "OWN_FORMS", "THREAD_COUNTS", "DeployRow",
           "deploy_markdown", "findings", "int8_markdown"]

THREAD_COUNTS = (1, 2)

#: the forms of the recipe's own model; "c8": a float model's quantize_int8 conversion as
#: C (not the recipe's model: shown in its own table)
OWN_FORMS = ("torch", "onnx", "c")
FORMS = (*OWN_FORMS, "c8")
FORM_LABELS = {"torch": "eager torch (.nnc)", "onnx": "ONNX Runtime (.onnx)",
               "c": "C int8 (ctypes)", "c8": "C int8 after quantize_int8 (ctypes)"}


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
        live = [(f, r) for f, r in self.forms[threads].items()
                if r.b1_ms is not None and f in OWN_FORMS]
        return min(live, key=lambda fr: fr[1].b1_ms or 0.0, default=None)

    @property
    def accuracy(self) -> float | None:
        best = self.best(THREAD_COUNTS[0])
        return None if best is None else best[1].accuracy

    def peer(self, threads: int, *, any_accuracy: bool = False,
             accuracy: float | None = None) -> Int8Row | None:
        """The fastest peer artifact at batch 1 whose accuracy is >= ours (or
        ``accuracy``; any accuracy with ``any_accuracy``)."""
        acc = self.accuracy if accuracy is None else accuracy
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
    where: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for form, row in r.forms[THREAD_COUNTS[0]].items():
            if row.error and form in OWN_FORMS:
                where[f"{form}: {row.error}"].append(f"{r.model} / {r.recipe}")
    notes = [f"- {why}: {', '.join(pairs)}" for why, pairs in sorted(where.items())]
    return "\n".join([render_markdown(headers, cells), "",
                      *(["Forms that do not exist or failed:", "", *notes] if notes else [])])


def int8_markdown(rows: list[DeployRow]) -> str:
    """Part (a2): the float rows' models converted by ``quantize_int8`` and run as C."""
    ts = "/".join(str(t) for t in THREAD_COUNTS)
    headers = ["model", "recipe", "recipe's accuracy", "+ int8 C accuracy",
               f"+ int8 C b1 ({ts} thr)", "fastest peer of >= accuracy",
               f"peer b1 ({ts} thr)", f"ratio peer / ours ({ts} thr)", "target met"]
    cells = []
    for r in rows:
        c8 = {t: r.forms[t].get("c8") for t in THREAD_COUNTS}
        first = c8[THREAD_COUNTS[0]]
        if first is None:
            continue
        if first.b1_ms is None:
            cells.append([r.model, r.recipe, fmt_pct(r.accuracy), "-", "-", "-", "-", "-",
                          f"no C form: {first.error}"])
            continue
        peers = {t: r.peer(t, accuracy=first.accuracy) for t in THREAD_COUNTS}
        ratios = [None if peers[t] is None or c8[t] is None or not c8[t].b1_ms
                  else peers[t].b1_ms / c8[t].b1_ms for t in THREAD_COUNTS]
        names = {("none as accurate" if p is None else f"{p.name} ({fmt_pct(p.accuracy)})")
                 for p in peers.values()}
        met = ("yes (no peer as accurate)" if all(p is None for p in peers.values()) else
               "yes" if all(x is not None and x >= 1.0 for x in ratios) else "NO")
        cells.append([r.model, r.recipe, fmt_pct(r.accuracy), fmt_pct(first.accuracy),
                      _pair([c8[t].b1_ms if c8[t] else None for t in THREAD_COUNTS], fmt_us),
                      " / ".join(sorted(names)),
                      _pair([p.b1_ms if p else None for p in peers.values()], fmt_us),
                      _pair(ratios, fmt_ratio), met])
    return "\n".join([
        "### (a2) The float rows + `quantize_int8`, deployed as C", "",
        "Not the recipes' own models: each float model of the table above converted by "
        "`quantize_int8` (minmax, 8 calibration batches; no fine-tuning) and exported to C, "
        "timed in the same interleaved rounds -- what chaining the recipe with `int8` (as "
        "recipe `prune-int8` does) would deploy. Same columns as above, for this form's "
        "accuracy.", "", render_markdown(headers, cells)])


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


def findings(rows: list[DeployRow]) -> str:
    """Why the target is missed where it is, from this run's figures."""
    t = THREAD_COUNTS[0]
    same = _same_graph_overhead(rows, t)
    missed = [r for r in rows if r.met is False]
    float_missed = [r for r in missed if (r.best(t) or ("", None))[0] in ("onnx", "torch")
                    and r.forms[t].get("c") is not None and r.forms[t]["c"].b1_ms is None]
    parts = [f"Where the target is missed ({len(missed)} of {len(rows)} rows): "
             f"{len(float_missed)} of them deploy a float model (ONNX Runtime fp32 kernels) "
             "against int8 peers or against ORT fp32 of the same-sized model; unstructured "
             "zeros (magnitude-prune, deep-compression before dead units go) run as dense "
             "matrices in ONNX Runtime, so they buy no batch-1 time."]
    if same:
        lo, hi = min(x for _, x in same), max(x for _, x in same)
        parts.append(f"On the uncompressed models our ONNX (through `runtime.load(...)"
                     f".predict`) and the peer's ORT fp32 session run the same graph, yet "
                     f"ours takes {lo:.2f}-{hi:.2f}x the peer's batch-1 time at {t} thread "
                     f"({', '.join(f'{m} {x:.2f}x' for m, x in same)}): a ratio above 1 "
                     "there is the `predict` wrapper's per-call cost (input checks and "
                     "copies), below 1 timing noise.")
    parts.append("The int8 rows (C or the int8 engine) meet it; table (a2) shows what the "
                 "float rows would deploy after `quantize_int8`.")
    return " ".join(parts)

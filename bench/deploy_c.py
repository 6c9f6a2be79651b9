"""Bench section, parts (b)-(d) of the deployment section (issue 10; part (a) and the
orchestration are in :mod:`deploy`).

(b) Structured 2x-MAC pruning in the deployed forms: cnn1d pruned by L1 filter norm (Li
    et al. 2017) and by ThiNet (Luo, Wu & Lin 2017) to 2x fewer MACs, fine-tuned, BatchNorm
    folded (``bench/structured.py``'s stages), exported to float ONNX and to int8 C
    (``quantize_int8``, Jacob et al. 2018); batch-1 speed-up against the unpruned model in
    the same form (target >= 1.6x).
(c) Generated C, int8, batch 1, on the MLP and the 1-D CNN: the C export through
    ``runtime.load`` (ctypes) against ONNX Runtime fp32 of the same float model (target
    >= 2x), both from part (a)'s rounds (the uncompressed row), and a C timing loop.
(d) Flash / RAM of the C export per reference model (``size`` on the object compiled with
    the export's own flags), beside the program's int8 weight bytes (+-1 weights of a
    binarized layer at 1 bit).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from c_loop import LOOP_ROUNDS, LOOP_SECONDS, c_loop_ms, fmt_us
from deploy import (
    THREAD_COUNTS,
    UNCOMPRESSED,
    DeployRow,
    Exported,
    export_forms,
    form_artifacts,
    int8_of,
)
from int8 import Int8Row, measure_artifacts
from nncompress import models as zoo
from nncompress.data import Dataset, example_input
from nncompress.measure import count_macs
from nncompress.report import fmt_bytes, fmt_count, fmt_ms, fmt_pct, fmt_ratio, render_markdown
from peers import try_peer
from structured import _cnn_methods, _ours

__all__ = ["c_parts", "flash_table", "structured_part", "weight_bytes"]

SEED = 0
STRUCT_METHODS = ("nncompress l1_filter_prune (filter L1) + fold_batchnorm",
                  "nncompress thinet + fold_batchnorm")
STRUCT_TARGET = 1.6
C_TARGET = 2.0
FLASH_TARGET = 1.15
C_MODELS = ("mlp", "cnn1d")
FLASH_MODELS = ("mlp", "cnn1d", "cnn2d", "rescnn", "gru", "lstm")
_WEIGHT_ROLES = frozenset({"w", "weight", "w_ih", "w_hh"})


def _ts() -> str:
    return "/".join(str(t) for t in THREAD_COUNTS)


def _cells(values: Sequence[float | None], fmt: Callable[[float | None], str]) -> str:
    return " / ".join(fmt(v) for v in values)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# ----------------------------------------------------------------- (b) structured pruning


@dataclass(frozen=True)
class StructVariant:
    label: str
    accuracy: dict[str, float | None]      # form -> test accuracy
    macs: int
    b1: dict[str, dict[int, float | None]]  # form -> threads -> ms


def _struct_models(root: Path, echo: Callable[[str], None]
                   ) -> tuple[Dataset, list[tuple[str, nn.Module]]]:
    model, data = zoo.load("cnn1d", "mnist1d", seed=SEED, progress=False)
    found: list[tuple[str, nn.Module]] = [("unpruned", model.eval())]
    methods = _cnn_methods(2.0)
    for method in STRUCT_METHODS:
        echo(f"  deploy (b): cnn1d {method}")
        got, err = try_peer(lambda method=method: _ours(model, data, methods[method], root))
        if got is None:
            echo(f"  deploy (b): {method} failed: {err}")
            continue
        found.append((method.removeprefix("nncompress "), got.eval()))
    return data, found


def structured_part(root: Path, echo: Callable[[str], None]) -> str:
    """Part (b) as markdown."""
    root.mkdir(parents=True, exist_ok=True)
    data, variants = _struct_models(root, echo)
    exports = []
    for k, (label, model) in enumerate(variants):
        exports.append(export_forms(label, model, data, root / f"v{k}",
                                    c_source=int8_of(model, data)))
    measured: dict[int, list[Int8Row]] = {}
    for threads in THREAD_COUNTS:
        arts = [a for e in exports for a in form_artifacts(e, threads)]
        arts[0] = replace(arts[0], kind="fp32")          # unpruned eager: the baseline
        measured[threads] = measure_artifacts(arts, data, threads=threads)
    x = example_input(data, 1)
    loops = _loops(exports, x)
    rows = []
    for exp, (_, model), loop in zip(exports, variants, loops, strict=True):
        def pick(threads: int, form: str, exp: Exported = exp) -> Int8Row | None:
            return next((r for r in measured[threads] if r.name == f"{exp.label} | {form}"),
                        None)
        forms = ("torch", "onnx", "c")
        acc = {f: (pick(THREAD_COUNTS[0], f) or _none()).accuracy for f in forms}
        b1 = {f: {t: (pick(t, f) or _none()).b1_ms for t in THREAD_COUNTS} for f in forms}
        acc["loop"], b1["loop"] = acc["c"], {t: loop if t == 1 else None for t in THREAD_COUNTS}
        rows.append(StructVariant(exp.label, acc, count_macs(model, x).total, b1))
    return _struct_markdown(rows, exports)


def _loops(exports: Sequence[Exported], x: torch.Tensor) -> list[float | None]:
    """The C timing loop's batch-1 ms of each export's C form (None without one)."""
    folders = [e.paths.get("c") for e in exports]
    got = iter(c_loop_ms([f for f in folders if f is not None], x))
    return [next(got) if f is not None else None for f in folders]


def _none() -> Int8Row:
    return Int8Row("-", "ours", None, None, None, None, None, None, None, None, None, None,
                   "")


_FORM_NAMES = {"torch": "eager torch", "onnx": "ONNX Runtime (float ONNX)",
               "c": "C int8 (runtime.load, ctypes)", "loop": "C int8 (C timing loop, 1 thread)"}


def _struct_markdown(rows: list[StructVariant], exports: list[Exported]) -> str:
    base = rows[0]
    headers = ["variant", "form", "accuracy", "MACs", f"b1 ({_ts()} thr)",
               f"speed-up vs unpruned, same form ({_ts()} thr)",
               f">= {STRUCT_TARGET}x (both)"]
    cells = []
    for row in rows:
        for form, label in _FORM_NAMES.items():
            speed = [_ratio(base.b1[form][t], row.b1[form][t]) for t in THREAD_COUNTS]
            known = [v for v in speed if v is not None]
            met = "-" if row is base else (
                "yes" if known and all(v >= STRUCT_TARGET for v in known) else "NO")
            cells.append([row.label, label, fmt_pct(row.accuracy[form]), fmt_count(row.macs),
                          _cells([row.b1[form][t] for t in THREAD_COUNTS], fmt_us),
                          _cells(speed, fmt_ratio), met if form != "torch" else "-"])
    errors = sorted({f"- {e.label}, {f}: {err}" for e in exports for f, err in e.errors.items()})
    return "\n".join([
        "### (b) Structured 2x-MAC pruning in the deployed forms (cnn1d)", "",
        "cnn1d (mnist1d) pruned to 2x fewer MACs by `l1_filter_prune` (Li et al. 2017, "
        "filter L1) and by `thinet` (Luo et al. 2017), each fine-tuned 20 epochs (Adam, lr "
        "3e-3, cosine) and BatchNorm-folded -- the stages of the structured-pruning section. "
        "Each variant is run as eager torch, as float ONNX in ONNX Runtime and as int8 C "
        "(`quantize_int8` of the variant, C export, ctypes) through `runtime.load`; all "
        "timed interleaved (the int8 section's rounds; median ms per batch-1 call). "
        f"Speed-up = the unpruned model's batch-1 median in the same form / the variant's; "
        f"target (issue 10): >= {STRUCT_TARGET}x in the deployed forms (ONNX, C) at both "
        "thread counts. Eager torch is shown for comparison (the issue quotes 1.44x). "
        "The C timing loop row is the same exported `model.c` linked into a C program that "
        "calls `nnc_predict` on one test sample in a loop (gcc -O3 -march=native, "
        f"{LOOP_ROUNDS} interleaved rounds of ~{LOOP_SECONDS * 1e3:.0f} ms per variant, "
        "median): what a device without Python would see.",
        "", render_markdown(headers, cells), "",
        *(["Failed forms:", "", *errors, ""] if errors else [])]).rstrip()


# ----------------------------------------------------------------- (c) C vs ORT fp32


#: (ORT fp32 row, C int8 row) per thread count, from part (a)'s uncompressed row
CPair = dict[int, tuple[Int8Row | None, Int8Row | None]]


def _c_pair(row: DeployRow) -> CPair:
    """The uncompressed row's ORT fp32 peer and its C form made at deployment."""
    return {t: (next((r for r in row.peers[t] if r.kind == "ort-fp32"), None),
                row.forms[t].get("c8")) for t in THREAD_COUNTS}


def _c_cells(name: str, pair: CPair, loop: float | None) -> list[str]:
    ort = {t: pair[t][0] or _none() for t in THREAD_COUNTS}
    c = {t: pair[t][1] or _none() for t in THREAD_COUNTS}
    speed = [_ratio(ort[t].b1_ms, c[t].b1_ms) for t in THREAD_COUNTS]
    ok = all(s is not None and s >= C_TARGET for s in speed)
    loop_speed = _ratio(ort[1].b1_ms, loop)
    ok_loop = loop_speed is not None and loop_speed >= C_TARGET
    return [name, fmt_pct(ort[1].accuracy), fmt_pct(c[1].accuracy),
            _cells([ort[t].b1_ms for t in THREAD_COUNTS], fmt_us),
            _cells([c[t].b1_ms for t in THREAD_COUNTS], fmt_us),
            _cells(speed, fmt_ratio), fmt_us(loop), fmt_ratio(loop_speed),
            _cells([ort[t].b256_ms for t in THREAD_COUNTS], fmt_ms),
            _cells([c[t].b256_ms for t in THREAD_COUNTS], fmt_ms),
            ("yes" if ok else "NO" + _why(c[1])) + " / " + ("yes" if ok_loop else "NO")]


def _c_markdown(found: dict[str, CPair], loops: dict[str, float | None]) -> str:
    headers = ["model", "ORT fp32 accuracy", "C int8 accuracy", f"ORT fp32 b1 ({_ts()} thr)",
               f"C int8 b1, ctypes ({_ts()} thr)", f"C speed-up b1, ctypes ({_ts()} thr)",
               "C int8 b1, C timing loop", "C loop speed-up vs ORT fp32 (1 thr)",
               f"ORT fp32 b256 ({_ts()} thr)", f"C int8 b256 ({_ts()} thr)",
               f">= {C_TARGET}x at b1 through ctypes (both) / in the C loop"]
    cells = [_c_cells(name, pair, loops.get(name)) for name, pair in found.items()]
    return "\n".join([
        "### (c) Generated C, int8, batch 1, against ONNX Runtime fp32", "",
        "The trained float model in ONNX Runtime (TorchScript export, the int8 section's "
        "ORT fp32 peer) against its `quantize_int8` conversion exported to C "
        "(`nc.export(..., format='c')`) and called through `runtime.load` (gcc -O3 "
        "-march=native, ctypes; the batch runs in one C call): the ORT fp32 peer and the "
        "\"C int8 (quantize_int8 at deployment)\" form of part (a)'s uncompressed row, "
        "from the same interleaved rounds (the int8 section's timing, median ms per call). "
        f"Target (issue 10): C >= {C_TARGET}x faster than ORT fp32 at batch 1 on the MLP "
        "and the 1-D CNN. The C timing loop: the same `model.c` linked into a C program "
        "calling `nnc_predict` on one test sample in a loop (no Python, no ctypes; see "
        "part (b)); it is compared with ORT fp32's 1-thread figure (ORT through its Python "
        "API, as a peer user runs it).",
        "", render_markdown(headers, cells)])


def _why(row: Int8Row) -> str:
    return f" ({row.error})" if row.error else ""


# ----------------------------------------------------------------- (d) flash / RAM


def weight_bytes(program: object) -> tuple[int, int]:
    """(int8 weight bytes, of which binary) of an integer program: every int8 weight
    matrix / kernel / embedding table at 1 byte per weight, a linear / conv weight whose
    values are all +-1 at 1 bit per weight (how the C export stores it)."""
    seen: set[str] = set()
    total = binary = 0
    for op in program.ops:                                         # type: ignore[attr-defined]
        for role, const in op.consts.items():
            tensor = program.consts[const]                        # type: ignore[attr-defined]
            short = role.rsplit(".", 1)[-1]
            wanted = short in _WEIGHT_ROLES or (op.kind == "embedding" and short == "table")
            if const in seen or tensor.dtype != torch.int8 or not wanted:
                continue
            seen.add(const)
            if op.kind in ("linear", "conv") and bool(((tensor == 1) | (tensor == -1)).all()):
                packed = -(-tensor.numel() // 8)
                total, binary = total + packed, binary + packed
            else:
                total += tensor.numel()
    return total, binary


def section_sizes(folder: Path) -> dict[str, int]:
    """Bytes per section kind of ``folder/model.c`` compiled with the C export's own
    flags (``c_source.MCU_FLAGS``): ``code`` (.text*), ``const`` (.rodata*), ``data``,
    ``bss`` (binutils ``size -A``)."""
    from nncompress.export.c_source import MCU_FLAGS

    obj = folder / "sizes.o"
    subprocess.run(["gcc", *MCU_FLAGS, "-c", "-o", str(obj), str(folder / "model.c")],
                   check=True, capture_output=True)
    text = subprocess.run(["size", "-A", str(obj)], check=True, capture_output=True,
                          text=True).stdout
    obj.unlink()
    out = {"code": 0, "const": 0, "data": 0, "bss": 0}
    for name, size in re.findall(r"^(\.\S+)\s+(\d+)", text, flags=re.MULTILINE):
        kind = ("code" if name.startswith(".text") else "const" if name.startswith(".rodata")
                else "data" if name.startswith(".data") else "bss" if name.startswith(".bss")
                else None)
        if kind is not None:
            out[kind] += int(size)
    return out


@dataclass(frozen=True)
class FlashRow:
    model: str
    flash: int | None
    ram: int | None
    weights: int
    binary: int
    sizes: dict[str, int] | None
    error: str | None = None


def _flash_row(label: str, c_model: nn.Module, data: Dataset, folder: Path,
               done: Any = None) -> FlashRow:
    """Flash / RAM of ``c_model``'s C export in ``folder``; ``done``: the ExportResult
    when it was exported there already (else exported now)."""
    from nncompress.export import export, program_of

    program = program_of(c_model)
    weights, binary = weight_bytes(program) if program is not None else (0, 0)
    result, err = ((done, None) if done is not None else
                   try_peer(lambda: export(c_model, folder, example_input(data, 4),
                                           format="c")))
    if result is None:
        return FlashRow(label, None, None, weights, binary, None, err)
    sizes, err = try_peer(lambda: section_sizes(folder))
    return FlashRow(label, result.flash_bytes, result.ram_bytes, weights, binary, sizes, err)


def flash_table(rows: list[FlashRow]) -> str:
    headers = ["model", "flash bytes", "RAM bytes", "int8 weight bytes (binary at 1 bit)",
               "flash / weight bytes", "const bytes (.rodata)", "code bytes (.text)", "note"]
    cells = []
    for r in rows:
        ratio = _ratio(r.flash, r.weights)
        target = (f" (target <= {FLASH_TARGET}x: {'met' if ratio <= FLASH_TARGET else 'NOT met'})"
                  if r.model == "mlp" and ratio is not None else "")
        wb = f"{r.weights:,}" + (f" ({r.binary:,} of them binary)" if r.binary else "")
        cells.append([r.model, _num(r.flash), _num(r.ram), wb, fmt_ratio(ratio) + target,
                      _num(r.sizes and r.sizes["const"]), _num(r.sizes and r.sizes["code"]),
                      f"failed: {r.error}" if r.error else ""])
    return render_markdown(headers, cells)


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,} ({fmt_bytes(n)})"


def _flash_markdown(rows: list[FlashRow]) -> str:
    return "\n".join([
        "### (d) Flash and RAM of the generated C", "",
        "Each reference model converted by `quantize_int8` (a binarized MLP: recipe "
        "`binarize` then `quantize_int8`) and exported with `nc.export(..., format='c')`: "
        "the C files of part (a)'s uncompressed and binarize rows. "
        "Flash and RAM are the export's own figures: `size` on `model.c` compiled with "
        "`gcc -std=c99 -Wall -Wextra -Werror -O2` (flash = text + data: code and const "
        "arrays; RAM = data + bss: the static arena with any recurrent state; stack not "
        "counted). Const / code: the `.rodata*` / `.text*` sections (`size -A`) of the same "
        "compile. int8 weight bytes: the program's int8 weight matrices, kernels and "
        "embedding tables at 1 byte per weight, +-1 weights at 1 bit (biases, multipliers "
        "and tables are not weights, so they count in the ratio's numerator only). "
        f"Target (issue 10): flash of the int8 MLP <= {FLASH_TARGET}x its int8 weight bytes. "
        "The transformer is not listed: its LayerNorm / softmax stay float and the C "
        "export refuses float ops (it would need `<math.h>`).",
        "", flash_table(rows)])


def _flash_of(name: str, exp: Exported | None, data: Dataset, root: Path) -> FlashRow:
    """The flash row of reference model ``name`` from part (a)'s conversion at
    deployment (``exp``: its uncompressed export; converted here when None)."""
    if exp is None:
        model = zoo.load(name, seed=SEED, progress=False)[0].eval()
        q, err = try_peer(lambda: int8_of(model, data))
        return (FlashRow(name, None, None, 0, 0, None, err) if q is None
                else _flash_row(name, q, data, root / f"{name}-flash"))
    if exp.c8_model is None or "c8" not in exp.paths:
        return FlashRow(name, None, None, 0, 0, None, exp.errors.get("c8", "no C form"))
    return _flash_row(name, exp.c8_model, data, exp.paths["c8"], exp.c8_result)


def c_parts(root: Path, echo: Callable[[str], None],
            keep: dict[tuple[str, str], Exported], rows: Sequence[DeployRow]) -> list[str]:
    """Parts (c) and (d) as markdown blocks from part (a)'s exports (``keep``: the
    uncompressed models' conversions at deployment, the binarized MLP) and timings
    (``rows``); only the C timing loop and the section sizes are measured here."""
    root.mkdir(parents=True, exist_ok=True)
    by_pair = {(r.model, r.recipe): r for r in rows}
    flash: list[FlashRow] = []
    timed: dict[str, CPair] = {}
    loops: dict[str, float | None] = {}
    for name in FLASH_MODELS:
        echo(f"  deploy (c/d): {name} int8 C")
        data = zoo.load(name, seed=SEED, progress=False)[1]
        exp = keep.get((name, UNCOMPRESSED))
        flash.append(_flash_of(name, exp, data, root))
        row = by_pair.get((name, UNCOMPRESSED))
        if name in C_MODELS and row is not None:
            timed[name] = _c_pair(row)
            folder = exp.paths.get("c8") if exp is not None else None
            if folder is not None:
                loops[name] = c_loop_ms([folder], example_input(data, 1))[0]
    binarized = keep.get(("mlp", "binarize"))
    if binarized is not None and binarized.c_model is not None:
        data = zoo.load("mlp", seed=SEED, progress=False)[1]
        folder = binarized.paths.get("c")
        flash.append(_flash_row("mlp (binarized)", binarized.c_model, data,
                                folder or root / "mlp-binary-flash", binarized.c_result))
    elif binarized is not None:
        flash.append(FlashRow("mlp (binarized)", None, None, 0, 0, None,
                              binarized.errors.get("c", "no C form")))
    return [_c_markdown(timed, loops), _flash_markdown(flash)]


if __name__ == "__main__":
    import sys
    with tempfile.TemporaryDirectory() as tmp:
        print(structured_part(Path(tmp), lambda m: print(m, file=sys.stderr)))

"""Fuzzing the ``.nnc`` reader: seeded mutations of saved files, each loaded in a forked
child under a time bound, its peak memory measured.

Every case must end in a loaded model or a one-line FormatError. Seed files: small
reference models (dense; pruned, weight-shared, BatchNorm folded), a user model with an
fp16 tensor, a HashedLinear, a version-1 file. Mutations (1-3 per case): bit flips and
truncations (the checksum catches them), byte edits of the header or payload behind a
recomputed checksum, and structure-aware edits of shapes, dtypes, encodings, params,
lengths, names, tensor order, builder configs and module records (to 0, 2**26, 2**31...).

Usage: ``python bench/fuzz.py [--cases 10000] [--seed 0]``. ``SECTIONS`` lists the
fuzzers this page shows, ``(title, bench(echo, cases, seed), markdown(result))``; the
recipe reader's (``bench/fuzz_recipes.py``) can join it. ``tests/test_formats_fuzz.py``
runs a few hundred of these cases in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nncompress import formats
from nncompress import models as zoo
from nncompress.errors import FormatError
from nncompress.formats import DTYPES, ENCODINGS
from nncompress.formats.arch import describe
from nncompress.formats.header import json_header, pack_chunks, parse_header, unpack
from nncompress.formats.layer_types import layer_types
from nncompress.formats.table import Reader, varint, write_header
from nncompress.share.hashing import HashedLinear

#: seconds one case may take; a child still running at twice this is killed
TIME_BOUND = 5.0
OUTCOMES = ("loaded", "format_error", "other_exception", "over_time")
INTERESTING = (0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 33, 63, 64, 255, 256, 1023, 1024, 4095,
               65535, 65536, 2**20, 2**24, 2**26, 2**28, 2**31 - 1, 2**31, 2**32, 2**40)
SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40)}
SMALL = {"mlp": {"hidden": [24, 16]}, "cnn1d": {"channels": [8, 8, 16]},
         "gru": {"hidden": [12]}, "lstm": {"hidden": [8, 8]},
         "rescnn": {"channels": 8, "hidden": [16, 16]},
         "transformer": {"dim": 16, "num_heads": [2, 2], "head_dim": [8, 8],
                         "mlp_dim": [32, 32]}}


def _user_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def _compress(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """BatchNorms removed as folding does (each layer before one gains a bias), 85 % of
    every weight matrix zeroed, the rest on 16 values."""
    from nncompress.quant.fold import fold_pairs

    for layer, norm in fold_pairs(model, torch.randn(4, *shape)):
        conv = model.get_submodule(layer)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.randn(conv.weight.shape[0]))
        model.set_submodule(norm, nn.Identity())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                cut = p.abs().flatten().kthvalue(max(1, int(0.85 * p.numel()))).values
                codes = torch.linspace(float(p.min()), float(p.max()), 16)
                shared = codes[(p.unsqueeze(-1) - codes).abs().argmin(-1)]
                p.copy_(torch.where(p.abs() > cut, shared, torch.zeros_like(p)))
    return model


def seed_files(folder: Path) -> list[tuple[str, Path, Callable[[], nn.Module] | None]]:
    """(label, path, skeleton factory or None) of every file the mutations start from."""
    out = []
    for name, small in SMALL.items():
        shape = SHAPES[zoo.spec(name).default_dataset]
        for kind in ("dense", "compressed"):
            torch.manual_seed(0)
            model = zoo.build(name, shape, 10, **small).eval()
            if kind == "compressed":
                model = _compress(model, shape)
            path = folder / f"{name}-{kind}.nnc"
            formats.save(model, path, meta={"seed": name})
            out.append((f"{name} {kind}", path, None))
    user = _user_model()
    formats.save(user, folder / "user.nnc", encodings={"0.weight": "fp16"})
    out.append(("user model, fp16", folder / "user.nnc", _user_model))
    hashed = zoo.build("mlp", SHAPES["digits"], 10, **SMALL["mlp"]).eval()
    hashed.layers.fc2 = HashedLinear(24, 16, 40, seed=3)
    formats.save(hashed, folder / "hashed.nnc")
    out.append(("mlp with a HashedLinear", folder / "hashed.nnc", None))
    header = formats.read_header(out[0][1])
    header["format_version"], header["arch"] = 1, describe(
        zoo.build("mlp", SHAPES["digits"], 10, **SMALL["mlp"]))
    (folder / "v1.nnc").write_bytes(b"".join(pack_chunks(json_header(header), [
        _split(out[0][1].read_bytes())[2]], version=1)))
    out.append(("mlp, format version 1", folder / "v1.nnc", None))
    return out


def _split(data: bytes) -> tuple[int, bytes, bytes]:
    length = int.from_bytes(data[8:16], "little")
    return int.from_bytes(data[4:8], "little"), data[16:16 + length], data[16 + length:-32]


def _resign(version: int, header: bytes, payload: bytes) -> bytes:
    return b"".join(pack_chunks(header, [payload], version=version))


def _byte_edits(blob: bytes, rng: random.Random) -> bytes:
    out = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        spot = rng.randrange(len(out))
        if rng.random() < 0.5:
            out[spot] = rng.randrange(256)
        else:
            out[spot:spot] = varint(rng.choice(INTERESTING))
    return bytes(out)


def _edit_fields(header: dict[str, Any], blobs: list[bytes], rng: random.Random) -> None:
    """One structure-aware edit of a ``read_header``-shaped dict and its tensors' data."""
    tensors = header["tensors"]
    entry = rng.choice(tensors) if tensors else None
    kind = rng.randrange(9)
    if entry is not None and kind == 0:
        dims = entry["shape"] or [1]
        dims[rng.randrange(len(dims))] = rng.choice(INTERESTING)
        entry["shape"] = dims if rng.random() < 0.8 else [*dims, rng.choice(INTERESTING)]
    elif entry is not None and kind == 1:
        entry["dtype"] = rng.choice(list(DTYPES))
    elif entry is not None and kind == 2:
        entry["encoding"] = rng.choice(ENCODINGS.names())
        keys = ENCODINGS.get(entry["encoding"]).param_keys
        entry["params"] = {k: entry["params"].get(k, rng.choice(INTERESTING)) for k in keys}
    elif entry is not None and kind == 3 and entry["params"]:
        entry["params"][rng.choice(sorted(entry["params"]))] = rng.choice(INTERESTING)
    elif kind == 4 and len(tensors) > 1:  # move bytes between neighbours
        i = rng.randrange(len(tensors) - 1)
        step = min(rng.choice(INTERESTING), len(blobs[i + 1]))
        blobs[i], blobs[i + 1] = blobs[i] + blobs[i + 1][:step], blobs[i + 1][step:]
    elif kind == 5 and tensors:
        i, j = rng.randrange(len(tensors)), rng.randrange(len(tensors))
        action = rng.randrange(3)
        if action == 0:
            tensors[i]["name"] = tensors[j]["name"] + rng.choice(["", "x", ".weight"])
        elif action == 1:
            del tensors[i], blobs[i]
        else:
            tensors[i], tensors[j] = tensors[j], tensors[i]
            blobs[i], blobs[j] = blobs[j], blobs[i]
    elif kind == 6 and header["arch"]["builder"].get("config"):
        _edit_json(header["arch"]["builder"]["config"], rng)
    elif kind == 7:
        _edit_modules(header, rng)
    else:
        header["meta"][f"k{rng.randrange(9)}"] = [rng.choice(INTERESTING)] * rng.randrange(50)
    for entry, blob in zip(tensors, blobs, strict=True):
        entry["length"] = len(blob)


def _edit_json(value: Any, rng: random.Random) -> None:
    """Set one number, list or string inside a JSON config to an odd value."""
    spots: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        node = stack.pop()
        for key in (node if isinstance(node, dict) else range(len(node))):
            spots.append((node, key))
            if isinstance(node[key], (dict, list)):
                stack.append(node[key])
    if spots:
        node, key = rng.choice(spots)
        node[key] = rng.choice([rng.choice(INTERESTING), -1, [rng.choice(INTERESTING)] * 3,
                                "x", None, 10**9, 20_000, True, 0.5])


def _edit_modules(header: dict[str, Any], rng: random.Random) -> None:
    """Record a random layer type, with odd args, at a path the model has (or not)."""
    names = [t["name"].rpartition(".")[0] for t in header["tensors"]] or [""]
    path = rng.choice([*names, "nope", "layers.0"])
    table = layer_types()
    type_name = rng.choice([t for t in table.names() if t != "HashedEmbedding"])
    current = header["arch"]["modules"].get(path)
    args: dict[str, Any] = {}
    for key in table.get(type_name).args:
        args[key] = rng.choice([rng.choice(INTERESTING), True, False, [3], [1, 1], None,
                                "zeros", 0.0, 20_000])
    if current and current.get("args") and rng.random() < 0.5:
        args = {**current["args"], rng.choice(list(current["args"]) or ["x"]):
                rng.choice(INTERESTING)}
    spec: dict[str, Any] = {"type": type_name, "args": args}
    if header["arch"]["builder"].get("name") and rng.random() < 0.5:
        spec = {"type": type_name, "args": dict(list(args.items())[:1]), "partial": True}
    header["arch"]["modules"][path] = spec


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One mutated file from a saved one (see the module docstring for the kinds)."""
    version, head, payload = _split(data)
    kind = rng.random()
    if kind < 0.08:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if kind < 0.12:
        return data[:rng.randrange(len(data))]
    if kind < 0.32:
        return _resign(version, _byte_edits(head, rng), payload)
    if kind < 0.45:
        return _resign(version, head, _byte_edits(payload, rng))
    if kind < 0.52 and version == 2:
        reader = Reader(head)
        try:
            text = reader.take(reader.varint("J"), "json")
        except FormatError:  # an earlier mutation broke the framing of the JSON part
            return _resign(version, _byte_edits(head, rng), payload)
        edited = _byte_edits(text, rng)
        return _resign(2, varint(len(edited)) + edited + head[reader.pos:], payload)
    return _structured(data, rng)


def _structured(data: bytes, rng: random.Random) -> bytes:
    version, head, payload = _split(data)
    try:
        header = parse_header(*unpack(data, "case")[1:2], version, len(payload)).to_json()
    except FormatError:  # an earlier mutation broke it: edit bytes instead
        return _resign(version, _byte_edits(head, rng), payload)
    blobs = [payload[t["offset"]:t["offset"] + t["length"]] for t in header["tensors"]]
    for _ in range(rng.randint(1, 3)):
        _edit_fields(header, blobs, rng)
    if version == 1:
        offset = 0
        for entry in header["tensors"]:
            entry["offset"], offset = offset, offset + entry["length"]
        return _resign(1, json_header(header), b"".join(blobs))
    try:
        raw = write_header(header["writer"], header["arch"], header["meta"], header["tensors"])
    except (ValueError, TypeError, KeyError, FormatError):  # e.g. args of another type
        return data
    return _resign(2, raw, b"".join(blobs))


def mutations(seeds: list[tuple[str, bytes]], cases: int, seed: int = 0
              ) -> list[tuple[str, bytes]]:
    """``cases`` (seed label, mutated file), deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(cases):
        label, data = rng.choice(seeds)
        for _ in range(rng.randint(1, 3) if rng.random() < 0.3 else 1):
            data = mutate(data, rng)
        out.append((label, data))
    return out


def load_case(path: Path, skeleton: Callable[[], nn.Module] | None) -> None:
    formats.load(path, skeleton=skeleton() if skeleton else None)


def classify(run: Callable[[], None]) -> tuple[str, str]:
    """(outcome, detail) of one load (any outcome but ``over_time``)."""
    try:
        run()
        return "loaded", ""
    except FormatError as exc:
        one_line = "\n" not in str(exc) and "\r" not in str(exc)
        return ("format_error" if one_line else "other_exception"), str(exc)[:300]
    except Exception as exc:
        return "other_exception", f"{type(exc).__name__}: {str(exc)[:300]}"


def _status(field: str) -> int:
    """A size from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _measured(run: Callable[[], None]) -> tuple[str, str, int]:
    """(outcome, detail, peak bytes resident above the start) of ``run()`` here."""
    try:  # reset the peak resident size (Linux >= 4.0), then watch it
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    start = _status("VmRSS")
    outcome, detail = classify(run)
    return outcome, detail, max(0, _status("VmHWM") - start)


class _CaseTimeout(BaseException):
    """Raised in a child's case that runs past twice the bound."""


def _expire(*_: object) -> None:
    raise _CaseTimeout


def _child(runs: list[Callable[[], None]], first: int, writer: int, bound: float) -> None:
    """Run cases ``first..`` one after the other, one JSON line per case to ``writer``."""
    signal.signal(signal.SIGALRM, _expire)
    for k in range(first, len(runs)):
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 2 * bound)
        try:
            outcome, detail, peak = _measured(runs[k])
        except _CaseTimeout:
            outcome, detail, peak = "over_time", "interrupted", 0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        line = [k, outcome, time.perf_counter() - start, peak, detail[:300]]
        os.write(writer, (json.dumps(line) + "\n").encode())


def run_cases(runs: list[Callable[[], None]], bound: float
              ) -> list[tuple[str, float, int, str]]:
    """(outcome, seconds, peak extra bytes resident, detail) of every ``run()``, run in
    forked children (a new one after a child had to be killed or died)."""
    results: list[Any] = [None] * len(runs)
    k = 0
    while k < len(runs):
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(reader)
            try:
                _child(runs, k, writer, bound)
            finally:
                os._exit(0)
        os.close(writer)
        k = _collect(reader, pid, results, k, bound)
    return results


def _collect(reader: int, pid: int, results: list[Any], k: int, bound: float) -> int:
    """Read a child's results; kill it if it goes silent. Returns the next case to run."""
    buffer = b""
    with os.fdopen(reader, "rb", buffering=0) as stream:
        while True:
            if not select.select([stream], [], [], 3 * bound)[0]:  # stuck past its alarm
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results[k] = ("over_time", 3 * bound, 0, "killed")
                return k + 1
            chunk = stream.read(65536)
            if not chunk:
                break
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                index, outcome, seconds, peak, detail = json.loads(line)
                results[index] = (outcome, seconds, peak, detail)
                k = index + 1
    os.waitpid(pid, 0)
    if k < len(results):  # the child died in case k
        results[k] = ("other_exception", 0.0, 0, "the process died")
        k += 1
    return k


def bench_fuzz_files(echo: Callable[[str], None], cases: int = 10_000,
                     seed: int = 0) -> dict[str, Any]:
    """Load ``cases`` seeded mutations of the seed files in forked children; count the
    outcomes. Returns ``{"cases", "seed", "seeds", "time_bound_s", "counts": {outcome:
    n}, "max_seconds", "slowest", "max_peak_bytes", "biggest", "by_seed": {label:
    counts}, "failures": [...]}`` (up to 20 cases that were neither loaded nor a one-line
    FormatError)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a forked child must not inherit a thread pool
    try:
        return _fuzz_files(echo, cases, seed)
    finally:
        torch.set_num_threads(previous)


def _fuzz_files(echo: Callable[[str], None], cases: int, seed: int) -> dict[str, Any]:
    counts = dict.fromkeys(OUTCOMES, 0)
    failures: list[dict[str, Any]] = []
    slowest, biggest = (0.0, ""), (0, "")
    with tempfile.TemporaryDirectory(prefix="nnc-fuzz-") as tmp:
        folder = Path(tmp)
        seeds = seed_files(folder)
        skeletons = {label: factory for label, _, factory in seeds}
        cases_list = mutations([(label, path.read_bytes()) for label, path, _ in seeds],
                               cases, seed)
        by_seed = {label: dict.fromkeys(OUTCOMES, 0) for label, _, _ in seeds}
        echo(f"fuzzing the .nnc reader: {len(cases_list)} cases from {len(seeds)} seed files "
             f"(seed {seed})")
        def case(label: str, data: bytes) -> Callable[[], None]:
            def run() -> None:
                target = folder / f"case-{os.getpid()}.nnc"
                target.write_bytes(data)
                load_case(target, skeletons[label])
            return run

        results = run_cases([case(label, data) for label, data in cases_list], TIME_BOUND)
        for k, ((label, _), (outcome, seconds, peak, detail)) in enumerate(
                zip(cases_list, results, strict=True)):
            counts[outcome] += 1
            by_seed[label][outcome] += 1
            slowest = max(slowest, (seconds, f"case {k} ({label})"))
            biggest = max(biggest, (peak, f"case {k} ({label})"))
            if outcome in ("other_exception", "over_time") and len(failures) < 20:
                failures.append({"case": k, "seed_file": label, "outcome": outcome,
                                 "seconds": seconds, "detail": detail[:200]})
    return {"cases": len(cases_list), "seed": seed, "seeds": [s[0] for s in seeds],
            "time_bound_s": TIME_BOUND, "counts": counts, "max_seconds": slowest[0],
            "slowest": slowest[1], "max_peak_bytes": biggest[0], "biggest": biggest[1],
            "by_seed": by_seed, "failures": failures}


def fuzz_markdown(result: dict[str, Any]) -> str:
    """The outcome counts (all cases and per seed file) and any failures, for
    BENCHMARKS.md."""
    total = max(1, result["cases"])
    names = {"loaded": "loaded", "format_error": "one-line FormatError",
             "other_exception": "other exception", "over_time": "over the time bound"}
    lines = [
        f"`.nnc` reader (`formats.load`), {result['cases']} seeded mutations (seed "
        f"{result['seed']}) of {len(result['seeds'])} saved files, loaded in forked "
        f"children. Time bound {result['time_bound_s']:.0f} s per case; slowest case "
        f"{result['max_seconds']:.2f} s ({result['slowest']}); largest growth of the "
        f"resident peak during a case {result['max_peak_bytes'] / 2**20:.1f} MiB "
        f"({result['biggest']}).", "", "| outcome | cases | share |", "|---|---:|---:|"]
    lines += [f"| {names[k]} | {n} | {100 * n / total:.1f} % |"
              for k, n in result["counts"].items()]
    lines += ["", "| seed file | " + " | ".join(names[k] for k in OUTCOMES) + " |",
              "|---|" + "---:|" * len(OUTCOMES)]
    lines += [f"| {label} | " + " | ".join(str(c[k]) for k in OUTCOMES) + " |"
              for label, c in result["by_seed"].items()]
    if result["failures"]:
        lines += ["", "Failures (neither loaded nor a one-line FormatError):", ""]
        lines += [f"- case {f['case']} ({f['seed_file']}): {f['outcome']}, "
                  f"{f['detail'][:150]}" for f in result["failures"]]
    return "\n".join(lines)


#: The fuzzers shown on the benchmarks page: (title, bench(echo, cases, seed), markdown).
def _recipes(echo: Callable[[str], None], cases: int, seed: int) -> dict[str, Any]:
    from fuzz_recipes import bench_fuzz_recipes  # bench/ is on sys.path when run as a bench
    return bench_fuzz_recipes(echo, cases, seed)


def _recipes_markdown(result: dict[str, Any]) -> str:
    from fuzz_recipes import fuzz_recipes_markdown
    return fuzz_recipes_markdown(result)


SECTIONS: list[tuple[str, Callable[..., dict[str, Any]], Callable[[dict[str, Any]], str]]] = [
    ("Hostile .nnc files", bench_fuzz_files, fuzz_markdown),
    ("Hostile recipes", _recipes, _recipes_markdown),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for title, bench, markdown in SECTIONS:
        print(f"## {title}\n\n{markdown(bench(print, args.cases, args.seed))}\n")


if __name__ == "__main__":
    main()

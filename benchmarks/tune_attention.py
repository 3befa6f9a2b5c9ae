"""Sweep the attention kernels' tile configs on this GPU and (with --write-table) rewrite the shipped table.

    python -m benchmarks.tune_attention [--budget-s 240] [--out DIR] [--write-table] [--shapes ...] [--sweep ...]
    python -m benchmarks.tune_attention --from-csv RESULTS/tune_attention.csv --write-table   # no GPU
    python -m benchmarks.tune_attention --from-csv RESULTS/tune_attention.csv --compare-with OLD_TILES.py

For each shape below, every candidate of every kernel (forward, dK/dV, dQ, atomic-dQ backward;
``mimkernels.triton.attention_tuning.CANDIDATES``) is checked against the float32 reference and timed alone
(median of CUDA-event timings, L2 flushed). The fastest correct one per kernel becomes the table entry for the
shape's key (GPU architecture, operand width, padded head dim, sequence class) in
``mimkernels/triton/attention_tiles.py``; entries of other keys are kept. The compiles come first, in parallel
worker processes that fill Triton's on-disk cache, so the budget goes to timing. Every trial is written to
``tune_attention.csv`` under --out, raw; ``--from-csv`` rebuilds the table from such a file. ``--sweep KERNEL ...``
times only those kernels' candidates and every other kernel at the tile the table gives it (``shape_candidates``):
e.g. whether the stored-dS backward beats the table's backward at shapes tuned before it existed, in a fifth of the
compiles.
The atomic-dQ backward, the delta-computing dQ kernel and the one-program-per-head backward get a table tile only
where they beat the other backwards (``attention_tuning.configs_from``). ``--compare-with`` (a copy of an older
attention_tiles.py, e.g. ``git show REV:mimkernels/triton/attention_tiles.py``) prints, per tuned shape, the
CSV's GPU time of the kernels that table and the rebuilt one pick: what a re-tune changes, in one run's figures.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import datetime
import importlib.util
import multiprocessing
import os
import pprint
import sys
import time

import torch

from benchmarks import bench_attention, common
from mimkernels.triton import attention as kernels
from mimkernels.triton import attention_tiles, attention_tuning

# One representative per table key, with the mask it is used with: shapes of bench_attention (its "prefix" mask is
# a per-sample prefix drawn in [1, N), which attention_tuning.make_problem calls "random").
TUNED = ("aim_600m", "n1024", "n4096", "vit_b", "mae_encoder", "mae_decoder", "vit_b_n257", "vit_h_n257",
         "mae_h_encoder")
_PREFIX_KIND = {"prefix": "random", "full": "full"}
SHAPES = {name: (*bench_attention.SHAPES[name][:4], _PREFIX_KIND[bench_attention.SHAPES[name][4]]) for name in TUNED}
TABLE_PATH = attention_tiles.__file__
CSV_FIELDS = ("shape", "key", "kernel", "config", "ms", "error", "note", "device", "torch", "triton", "commit", "date")


def _precompile_one(job, device: str = "cuda") -> str:
    """Worker: compile one (shape, kernel, config) by running it once on a 2-sample problem with the same
    strides and lengths as the real one (so Triton's specialisation, hence its cache key, is the same; the batch
    only changes the grid). ``device="cpu"``: benchmarks/triton_cache.py, which compiles for a GPU it pretends."""
    (batch, heads, seq_len, head_dim, prefix), dtype_name, kernel, text = job
    dtype = getattr(torch, dtype_name)
    problem = attention_tuning.make_problem(2, heads, seq_len, head_dim, dtype, prefix, device=device,
                                            with_reference=False)
    attention_tuning.sweep(problem, (kernel,), {kernel: (text,)}, timer=lambda fn: fn() and 0.0)
    if device == "cuda":
        torch.cuda.synchronize()
    return f"{kernel} {text}"


AT_TABLE_TILE = "the table's tile"  # the CSV note of a trial that --sweep timed at the table's tile only
# a table entry's fields, in order: AttentionConfigs', each named as the tuner's kernel it holds the tile of (the
# row-dot pre-pass has none)
TABLE_FIELDS = tuple(field.name for field in dataclasses.fields(kernels.AttentionConfigs))
assert set(TABLE_FIELDS) <= set(attention_tuning.KERNELS)


def anchored_kernels(name: str, arch: int, dtype: torch.dtype, swept=None, table=None) -> frozenset[str]:
    """The kernels that ``--sweep`` (``swept``: kernel names) times at tuned shape ``name`` only at the tile the
    table's entry for the shape's key gives them: all but the swept ones and the row-dot pre-pass (it has no table
    tile). Empty without ``swept``, or where the table (default the shipped one) has no entry: a whole sweep."""
    _, _, seq_len, head_dim, _ = SHAPES[name]
    table = attention_tiles.MEASURED if table is None else table
    if not swept or kernels.table_key(arch, head_dim, dtype, seq_len) not in table:
        return frozenset()
    return frozenset(attention_tuning.KERNELS) - {*swept, "backward_row_dot"}


def shape_candidates(name: str, arch: int, dtype: torch.dtype, swept=None, table=None) -> dict[str, tuple[str, ...]]:
    """The candidates timed at tuned shape ``name`` on a GPU of compute capability ``arch``: every candidate of its N,
    head dim and GPU (``attention_tuning.candidates_for``), except that each of the :func:`anchored_kernels` gets
    only the tile the table's entry gives it (none where it gives none): with ``swept``, a run that decides whether
    the swept kernels beat what the table runs, at a fraction of a whole sweep's compiles."""
    _, _, seq_len, head_dim, _ = SHAPES[name]
    candidates = attention_tuning.candidates_for(seq_len, head_dim=head_dim, arch=arch)
    table = attention_tiles.MEASURED if table is None else table
    anchored = anchored_kernels(name, arch, dtype, swept, table)
    if not anchored:
        return candidates
    tiles = dict(zip(TABLE_FIELDS, table[kernels.table_key(arch, head_dim, dtype, seq_len)]))
    return {kernel: tuple(text for text in (tiles.get(kernel),) if text) if kernel in anchored else texts
            for kernel, texts in candidates.items()}


def precompile_jobs(shapes: dict, dtype: torch.dtype, candidates: dict) -> list[tuple]:
    """One :func:`_precompile_one` job per candidate that a sweep of ``shapes`` would run (``candidates``: shape
    name -> kernel -> tile texts; the stored-dS kernels only where their buffer fits)."""
    return [(shape, str(dtype)[6:], kernel, text) for name, shape in shapes.items()
            for kernel, texts in candidates[name].items() for text in texts
            if kernel not in attention_tuning.STORED_DS_KERNELS or kernels.stored_ds_fits(*shape[:3], dtype.itemsize)]


def precompile(shapes: dict, dtype: torch.dtype, workers: int, deadline: float, candidates: dict) -> int:
    """Compile every candidate (``candidates``: shape name -> kernel -> tile texts) in ``workers`` processes; returns
    how many finished before the deadline."""
    jobs = precompile_jobs(shapes, dtype, candidates)
    done = 0
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_precompile_one, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures, timeout=max(1.0, deadline - time.monotonic())):
                done += future.exception() is None
        except concurrent.futures.TimeoutError:
            print(f"precompile: deadline reached after {done} of {len(jobs)} compiles", flush=True)
        for future in futures:
            future.cancel()
    return done


def table_text(measured: dict, provenance: dict) -> str:
    """The generated attention_tiles.py: its docstring kept, the two dicts rewritten."""
    with open(TABLE_PATH) as f:
        source = f.read()
    header = source[:source.index("MEASURED = ")]
    return (header + "MEASURED = " + pprint.pformat(dict(sorted(measured.items())), width=118, sort_dicts=False)
            + "\n\nPROVENANCE = " + pprint.pformat(dict(sorted(provenance.items())), width=118, sort_dicts=False)
            + "\n")


def table_entry(name: str, key: tuple, trials: list, source: str) -> tuple[str, tuple | None, str]:
    """(summary line, table value or None, provenance) of one tuned shape."""
    batch, heads, seq_len, head_dim, prefix = SHAPES[name]
    best = attention_tuning.fastest(trials)
    configs = attention_tuning.configs_from(best)
    line = (f"{name} B{batch} H{heads} N{seq_len} D{head_dim} {prefix}: "
            + ", ".join(f"{k} {t.config} {t.ms:.4f} ms" for k, t in best.items()))
    if configs is None:
        return line, None, ""
    value = tuple(str(cfg) if cfg else None for cfg in (getattr(configs, field) for field in TABLE_FIELDS))
    return line, value, f"{source}; {line}"


def entries_from_csv(path: str) -> list[tuple[tuple, str, tuple | None, str, tuple]]:
    """(key, summary line, table value, provenance, key the CSV recorded) per shape of a tune_attention.csv: the
    table rebuilt from raw measurements, e.g. after the choice rule changed, with no GPU. A known shape's key takes
    the sequence class of the current ``SEQ_CLASSES`` (the CSV's key is the one of the day it was measured)."""
    groups = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            groups.setdefault((row["shape"], row["key"]), []).append(row)
    entries = []
    for (name, key_text), rows in groups.items():
        recorded = tuple(int(part) for part in key_text.strip("()").split(","))
        key = (*recorded[:3], kernels.seq_class(SHAPES[name][2])) if name in SHAPES else recorded
        trials = [attention_tuning.Trial(r["kernel"], r["config"], float(r["ms"]) if r["ms"] else None,
                                         float(r["error"]) if r["error"] else None, r["note"]) for r in rows]
        first = rows[0]
        source = (f"{first['device']}, torch {first['torch']}, triton {first['triton']}, "
                  f"commit {short_commit(first['commit'])}, "
                  f"{first.get('date') or 'date not recorded'}; rebuilt from {os.path.basename(path)}")
        anchored = sorted({r["kernel"] for r in rows if r["note"] == AT_TABLE_TILE})
        if anchored:
            source += f"; {' '.join(anchored)} timed at the table's tiles only (--sweep)"
        entries.append((key, *table_entry(name, key, trials, source), recorded))
    return entries


def short_commit(commit: str) -> str:
    """A commit as the table's provenance names it: 7 hex digits, any "-dirty" kept (the CSV keeps it whole)."""
    sha, dash, rest = commit.partition("-")
    return sha[:7] + dash + rest


def _measured_at(provenance: str) -> str:
    """The shape name an entry's provenance ends with ("...; <name> B.. H.. N.. D.. <mask>: ...")."""
    return provenance.rpartition("; ")[2].split(" ", 1)[0]


def chosen_ms(times: dict, name: str, configs) -> tuple[float, float] | None:
    """(forward, deterministic backward) ms that ``configs`` costs at shape ``name`` by ``times`` ((shape, kernel,
    config text) -> ms); None where one of its kernels was not timed. The backward is the path the configs run
    with ``deterministic=True`` where the stored-dS buffer fits: row-dot pre-pass + dK/dV storing dS + dQ from dS,
    per head, dK/dV + delta-computing dQ, or row-dot pre-pass + dK/dV + dQ."""
    def ms(kernel, cfg):
        return times.get((name, kernel, str(cfg)))

    def row_dot():
        return min((t for (shape, kernel, _), t in times.items() if shape == name and kernel == "backward_row_dot"),
                   default=None)

    if configs.backward_dkdv_ds and configs.backward_dq_from_ds:
        parts = [row_dot(), ms("backward_dkdv_ds", configs.backward_dkdv_ds),
                 ms("backward_dq_from_ds", configs.backward_dq_from_ds)]
    elif configs.backward_per_head:
        parts = [ms("backward_per_head", configs.backward_per_head)]
    elif configs.backward_dq_delta:
        parts = [ms("backward_dkdv", configs.backward_dkdv), ms("backward_dq_delta", configs.backward_dq_delta)]
    else:
        parts = [row_dot(), ms("backward_dkdv", configs.backward_dkdv), ms("backward_dq", configs.backward_dq)]
    forward = ms("forward", configs.forward)
    if forward is None or None in parts:
        return None
    return forward, sum(parts)


def compare_lines(csv_path: str, old: dict, new: dict) -> list[str]:
    """Per tuned shape of the CSV: the GPU time of the kernels the ``old`` and ``new`` tables pick there."""
    with open(csv_path, newline="") as f:
        times = {(r["shape"], r["kernel"], r["config"]): float(r["ms"]) for r in csv.DictReader(f) if r["ms"]}
    lines = [f"{'shape':14s} {'forward':>15s} {'backward':>15s}  fwd+bwd: old time / new (ms, this CSV's timings)"]
    for name in dict.fromkeys(shape for shape, _, _ in times):
        if name not in SHAPES:
            continue
        _, _, seq_len, head_dim, _ = SHAPES[name]
        key = kernels.table_key(90, head_dim, torch.bfloat16, seq_len)
        picked = [kernels.measured_configs(key, table) for table in (old, new)]
        costs = [chosen_ms(times, name, configs) if configs else None for configs in picked]
        if None in costs:
            lines.append(f"{name:14s} not compared: a table has no entry here or picks a tile this CSV did not time")
            continue
        (old_fwd, old_bwd), (new_fwd, new_bwd) = costs
        lines.append(f"{name:14s} {old_fwd:7.4f} {new_fwd:7.4f} {old_bwd:7.4f} {new_bwd:7.4f}  "
                     f"{(old_fwd + old_bwd) / (new_fwd + new_bwd):.3f}x")
    return lines


def load_table(path: str) -> dict:
    """MEASURED of an attention_tiles.py at ``path``."""
    spec = importlib.util.spec_from_file_location("attention_tiles_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MEASURED


def write_table(measured: dict, provenance: dict) -> None:
    text = table_text(measured, provenance)  # reads the old file: before it is opened for writing
    with open(TABLE_PATH, "w") as f:
        f.write(text)
    print(f"wrote {len(measured)} entries to {TABLE_PATH}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop timing after this many seconds")
    parser.add_argument("--sweep", nargs="+", choices=attention_tuning.KERNELS, metavar="KERNEL",
                        help="sweep only these kernels' candidates; every other kernel is timed at the tile the "
                             "table's entry for the shape gives it, where it gives one (shape_candidates)")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help="parallel compile processes (0: compile while timing)")
    parser.add_argument("--out", default=None, help="folder for tune_attention.csv")
    parser.add_argument("--write-table", action="store_true", help="rewrite mimkernels/triton/attention_tiles.py")
    parser.add_argument("--from-csv", help="rebuild the entries from this tune_attention.csv instead (no GPU)")
    parser.add_argument("--compare-with", metavar="OLD_TILES_PY",
                        help="with --from-csv: that CSV's times of the kernels this older table and the rebuilt "
                             "one pick, per shape")
    args = parser.parse_args(argv)
    if args.compare_with and not args.from_csv:
        parser.error("--compare-with needs --from-csv (the timings it compares by)")
    if args.sweep and args.from_csv:
        parser.error("--sweep picks what a GPU run times; --from-csv rebuilds from timings already taken")
    measured, provenance = dict(attention_tiles.MEASURED), dict(attention_tiles.PROVENANCE)
    if args.from_csv:
        for key, line, value, source, recorded in entries_from_csv(args.from_csv):
            print(line)
            if value is not None:
                # the entry this shape had under the classes of its day goes: its key now belongs to other N
                if recorded != key and _measured_at(provenance.get(recorded, "")) == _measured_at(source):
                    del measured[recorded], provenance[recorded]
                measured[key], provenance[key] = value, source
        if args.compare_with:
            print("\n".join(compare_lines(args.from_csv, load_table(args.compare_with), measured)))
        if args.write_table:
            write_table(measured, provenance)
        return 0
    if not torch.cuda.is_available():
        print("tune_attention needs a CUDA GPU: the interpreter's timings mean nothing")
        return 0
    start = time.monotonic()
    deadline = start + args.budget_s
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shapes = {name: SHAPES[name] for name in args.shapes}
    arch = kernels._arch(torch.device("cuda"))
    candidates = {name: shape_candidates(name, arch, dtype, args.sweep) for name in shapes}
    provenance_base = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
                       f"{__import__('triton').__version__}, commit {short_commit(common.commit())}, "
                       f"{datetime.date.today().isoformat()}")
    if args.workers:
        done = precompile(shapes, dtype, args.workers, start + 0.45 * args.budget_s, candidates)
        print(f"precompile: {done} kernels in {time.monotonic() - start:.0f} s", flush=True)

    rows, summary = [], []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, commit=common.commit(),
                date=datetime.date.today().isoformat())
    for name, (batch, heads, seq_len, head_dim, prefix) in shapes.items():
        if time.monotonic() > deadline:
            summary.append(f"{name}: not tuned (budget spent)")
            continue
        key = kernels.table_key(arch, head_dim, dtype, seq_len)
        problem = attention_tuning.make_problem(batch, heads, seq_len, head_dim, dtype, prefix)
        anchored = anchored_kernels(name, arch, dtype, args.sweep)  # run at the table's tiles only (--sweep)
        source = provenance_base + (f"; swept {' '.join(args.sweep)}, the other kernels at the table's tiles"
                                    if anchored else "")

        def record(trial, name=name, key=key, anchored=anchored):
            rows.append(dict(shape=name, key=str(key), kernel=trial.kernel, config=trial.config,
                             ms=f"{trial.ms:.5f}" if trial.ms is not None else "",
                             error=f"{trial.error:.2e}" if trial.error is not None else "",
                             note=trial.note or (AT_TABLE_TILE if trial.kernel in anchored else ""), **meta))
            shown = f"{trial.ms:8.4f} ms" if trial.ms is not None else trial.note
            print(f"  {name:12s} {trial.kernel:16s} {trial.config:11s} {shown}", flush=True)

        trials = attention_tuning.sweep(problem, candidates=candidates[name], deadline=deadline, on_trial=record)
        line, value, source = table_entry(name, key, trials, source)
        summary.append(line)
        if value is not None:
            measured[key], provenance[key] = value, source
        del problem
        torch.cuda.empty_cache()
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "tune_attention.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows(rows)
    print("\n".join(["== fastest correct config per kernel"] + summary))
    if args.write_table:
        write_table(measured, provenance)
    print(f"tune_attention: {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

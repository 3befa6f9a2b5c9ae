"""The tile-table machinery: the sweep's checks and choice (through the interpreter), the table lookup, and the
table file the tune script writes. The timings themselves need a GPU (benchmarks/tune_attention.py)."""
import time

import pytest
import torch
from conftest import HAS_GPU

from benchmarks import tune_attention
from mimkernels.triton import attention as kernels
from mimkernels.triton import attention_tuning as tuning
from mimkernels.triton.attention import AttentionConfigs, TileConfig

pytestmark = pytest.mark.skipif(HAS_GPU, reason="runs the sweep through the Triton interpreter")

# in the order of a sweep (tuning.KERNELS)
TINY = {"forward": ("16x16x4x1", "32x16x4x1"), "backward_dkdv": ("16x32x4x1", "16x16x4x1"),
        "backward_dq": ("16x16x4x1",), "backward_row_dot": ("16x0x4x3",), "backward_dq_delta": ("32x16x4x1",),
        "backward_dkdv_ds": ("16x32x4x1",), "backward_dq_from_ds": ("16x16x4x1", "32x16x4x1"),
        "backward_per_head": ("16x32x4x1",), "backward_atomic": ("16x16x4x1",)}


def fake_timer(fn):
    """Calls fn (so it runs) and returns a time that makes the first candidate of each kernel the slowest."""
    fn()
    fake_timer.calls += 1
    return 1.0 / fake_timer.calls


fake_timer.calls = 0


@pytest.fixture
def problem():
    return tuning.make_problem(2, 1, 37, 16, torch.float32, device="cpu")


def test_tile_config_text_round_trip():
    cfg = TileConfig.parse("128x32x4x4")
    assert cfg == TileConfig(128, 32, 4, 4) and str(cfg) == "128x32x4x4"
    tma = TileConfig.parse("128x64x8x3+tma")
    assert tma == TileConfig(128, 64, 8, 3, tma=True) and str(tma) == "128x64x8x3+tma"
    with pytest.raises(ValueError, match="flag 'fast'"):
        TileConfig.parse("128x64x8x3+fast")
    tail = TileConfig.parse("128x32x4x4+tma+tail16")
    assert tail == TileConfig(128, 32, 4, 4, tma=True, tail_m=16) and str(tail) == "128x32x4x4+tma+tail16"
    assert TileConfig.parse("64x32x4x3+tail32") == TileConfig(64, 32, 4, 3, tail_m=32)
    for bad in ("64x32x4x3+tail8", "64x32x4x3+tail64", "64x32x4x3+tail24", "64x32x4x3+tail"):
        with pytest.raises(ValueError, match="tail|flag"):
            TileConfig.parse(bad)


def test_tail_tiles_cover_the_rows_past_the_last_whole_tile():
    """(tiles, tail tiles, TAIL_M): tails only where N leaves rows past the last whole block_m tile."""
    from mimkernels.triton.attention import query_tiles

    tail = TileConfig(128, 32, 4, 4, tail_m=16)
    assert query_tiles(256, tail) == (2, 0, 0)  # no rows left: the plain launch
    assert query_tiles(257, tail) == (3, 1, 16)  # 2 whole tiles and one of 16 rows for the 257th
    assert query_tiles(197, tail) == (6, 5, 16)  # 69 rows past 128: five 16-row tiles
    assert query_tiles(1, tail) == (1, 1, 16)
    assert query_tiles(197, TileConfig(128, 32, 4, 4)) == (2, 0, 0)  # no tail: one more 128-row tile


def test_tail_candidates_are_timed_only_where_n_has_a_tail():
    tails = {kernel: [t for t in texts if "tail" in t] for kernel, texts in tuning.CANDIDATES.items()}
    assert any(tails.values())
    at_256, at_197 = tuning.candidates_for(256), tuning.candidates_for(197)
    assert not any("tail" in t for texts in at_256.values() for t in texts)
    assert all(set(tails[kernel]) <= set(at_197[kernel]) for kernel in tails)
    assert {k: [t for t in v if "tail" not in t] for k, v in at_256.items()} == {
        k: [t for t in v if "tail" not in t] for k, v in tuning.CANDIDATES.items()}


def test_split_head_dim_candidates_are_timed_only_where_d_splits():
    splits = {kernel: [t for t in texts if "splitd" in t] for kernel, texts in tuning.CANDIDATES.items()}
    assert all(splits[kernel] for kernel in ("forward", "backward_dkdv", "backward_dq", "backward_dq_delta"))
    assert not any(splits[kernel] for kernel in ("backward_atomic", "backward_per_head"))  # no split kernels there
    at_d80, at_d128 = tuning.candidates_for(256, head_dim=80), tuning.candidates_for(256, head_dim=128)
    assert all(set(splits[kernel]) <= set(at_d80[kernel]) for kernel in splits)
    assert not any("splitd" in t for texts in at_d128.values() for t in texts)
    assert tuning.candidates_for(256) == tuning.candidates_for(256, head_dim=80)  # no head dim given: all kept


def test_dropped_candidates_were_measured_slow_everywhere():
    """tuning.MEASURED_SLOW holds what its comment says: each tile took at least 1.2x its kernel's fastest time at
    every shape of runs 9 and 10 (their committed H200 CSVs); sweeps on such a GPU (compute capability 90) leave
    them out, other GPUs' keep them."""
    import csv
    import pathlib
    runs = sorted(pathlib.Path(tune_attention.__file__).parent.glob("results/nvidia-h200/2026-12-04-run*/tune"))
    assert [path.parent.name[11:16] for path in runs] == ["run10", "run9-"]
    times = {}
    for path in runs:
        for row in csv.DictReader(open(path / "tune_attention.csv")):
            if row["ms"]:
                times.setdefault((path, row["shape"], row["kernel"]), {})[row["config"]] = float(row["ms"])
    on_hopper, elsewhere = tuning.candidates_for(256, arch=90), tuning.candidates_for(256, arch=80)
    assert list(tuning.MEASURED_SLOW) == [90]
    for kernel, slow in tuning.MEASURED_SLOW[90].items():
        assert not set(slow) & set(on_hopper[kernel]) and set(slow) <= set(elsewhere[kernel])
        assert set(on_hopper[kernel]) == set(elsewhere[kernel]) - set(slow)
        explicit = {kernel: slow}  # e.g. a table's tile that --sweep times: never dropped
        assert tuning.candidates_for(256, explicit, arch=90) == explicit
        for text in slow:
            ratios = [timed[text] / min(timed.values()) for (_, _, name), timed in times.items() if name == kernel]
            assert len(ratios) == 15 and min(ratios) >= 1.2, (kernel, text, ratios)


def test_every_candidate_parses_once():
    for kernel, texts in tuning.CANDIDATES.items():
        configs = [TileConfig.parse(text) for text in texts]
        assert len(set(configs)) == len(configs), kernel


def test_sweep_checks_times_and_picks_the_fastest(problem):
    """Every candidate of every kernel checked against the reference (the stored-dS kernels too: dK/dV with its dS
    store, dQ from the dS the portable tile stored) and timed, in the order of tuning.KERNELS."""
    fake_timer.calls = 0
    trials = tuning.sweep(problem, candidates=TINY, timer=fake_timer)
    assert [(t.kernel, t.config) for t in trials] == [(k, c) for k, texts in TINY.items() for c in texts]
    assert all(t.ms is not None and t.error < 1e-5 for t in trials), trials
    best = tuning.fastest(trials)
    assert best["forward"].config == "32x16x4x1" and best["backward_dkdv"].config == "16x16x4x1"
    # trial i takes 1 / i ms: per head (1/11 ms) is the fastest backward here, alone of the optional ones
    assert tuning.configs_from(best) == AttentionConfigs(*(TileConfig.parse(c) for c in (
        "32x16x4x1", "16x16x4x1", "16x16x4x1")), None, None, TileConfig.parse("16x32x4x1"))
    del best["backward_per_head"]
    # without it: stored dS (row dot 1/6 + 1/8 + 1/10) beats dK/dV + dQ with delta (1/4 + 1/7), and the atomic
    # backward (1/6 + 1/12) beats both; the delta-computing dQ stays the deterministic fallback
    assert tuning.configs_from(best) == AttentionConfigs(*(TileConfig.parse(c) for c in (
        "32x16x4x1", "16x16x4x1", "16x16x4x1", "16x16x4x1", "32x16x4x1")), None, *(TileConfig.parse(c) for c in (
            "16x32x4x1", "32x16x4x1")))


def test_a_dkdv_tile_storing_wrong_ds_is_never_timed(problem, monkeypatch):
    """The dK/dV-storing-dS trials are checked by the dQ from the dS they stored, not only by dK and dV."""
    real_dkdv = kernels.backward_dkdv

    def dkdv_storing_half(*args, ds=None, **kwargs):
        grads = real_dkdv(*args, ds=ds, **kwargs)
        if ds is not None:
            ds.mul_(0.5)
        return grads

    monkeypatch.setattr(kernels, "backward_dkdv", dkdv_storing_half)
    trials = tuning.sweep(problem, ("backward_dkdv", "backward_dkdv_ds"), TINY, timer=lambda fn: fn() or 1.0)
    assert [t.ms is None for t in trials] == [False, False, True], trials
    assert trials[-1].note.startswith("wrong")


def test_stored_ds_kernels_are_not_swept_where_the_buffer_would_not_fit(problem, monkeypatch):
    monkeypatch.setattr(kernels, "STORED_DS_MAX_BYTES", 2 * 37 * 48 * 4 - 1)  # a byte short of the problem's
    trials = tuning.sweep(problem, candidates=TINY, timer=lambda fn: fn() or 1.0)
    assert {t.kernel for t in trials} == set(TINY) - set(tuning.STORED_DS_KERNELS)


def test_the_optional_backward_kernels_are_chosen_only_if_faster():
    def trial(kernel, config, ms):
        return tuning.Trial(kernel, config, ms, 0.0)

    best = {"forward": trial("forward", "64x64x4x3", 0.1), "backward_dkdv": trial("backward_dkdv", "64x64x4x2", 0.2),
            "backward_dq": trial("backward_dq", "64x32x4x3", 0.1)}
    slower = tuning.configs_from({**best, "backward_atomic": trial("backward_atomic", "64x128x8x3", 0.31)})
    faster = tuning.configs_from({**best, "backward_atomic": trial("backward_atomic", "64x128x8x3", 0.29)})
    assert slower.backward_atomic is None and faster.backward_atomic == TileConfig(64, 128, 8, 3)
    assert tuning.configs_from(best).backward_atomic is None
    row_dot = {"backward_row_dot": trial("backward_row_dot", "16x0x4x3", 0.03)}
    slower = tuning.configs_from({**best, **row_dot,
                                    "backward_dq_delta": trial("backward_dq_delta", "64x32x4x3", 0.14)})
    faster = tuning.configs_from({**best, **row_dot,
                                    "backward_dq_delta": trial("backward_dq_delta", "64x32x4x3", 0.12)})
    assert slower.backward_dq_delta is None and faster.backward_dq_delta == TileConfig(64, 32, 4, 3)
    # the per-head backward (delta included) against the fastest other deterministic one: here dK/dV + dq_delta
    delta = {**best, **row_dot, "backward_dq_delta": trial("backward_dq_delta", "64x32x4x3", 0.12)}
    slower = tuning.configs_from({**delta, "backward_per_head": trial("backward_per_head", "32x128x8x3", 0.33)})
    faster = tuning.configs_from({**delta, "backward_per_head": trial("backward_per_head", "32x128x8x3", 0.31)})
    assert slower.backward_per_head is None and slower.backward_dq_delta == TileConfig(64, 32, 4, 3)
    assert faster.backward_per_head == TileConfig(32, 128, 8, 3) and faster.backward_dq_delta is None
    # the atomic backward must beat the fastest deterministic one, pre-pass included
    atomic = {**delta, "backward_per_head": trial("backward_per_head", "32x128x8x3", 0.25)}
    assert tuning.configs_from({**atomic, "backward_atomic": trial("backward_atomic", "64x128x8x3", 0.23)}
                               ).backward_atomic is None
    assert tuning.configs_from({**atomic, "backward_atomic": trial("backward_atomic", "64x128x8x3", 0.21)}
                               ).backward_atomic == TileConfig(64, 128, 8, 3)
    # the stored-dS backward (row dot + its dK/dV + dQ from dS) against the fastest deterministic one, which stays
    # chosen (it runs where the buffer does not fit); the atomic one must then beat the stored-dS one
    stored = {"backward_dkdv_ds": trial("backward_dkdv_ds", "64x64x4x2+tma", 0.18),
              "backward_dq_from_ds": trial("backward_dq_from_ds", "64x64x4x3", 0.05)}
    chosen = tuning.configs_from({**delta, **stored})  # 0.03 + 0.18 + 0.05 ms < dK/dV + dQ with delta 0.2 + 0.12
    assert (chosen.backward_dkdv_ds, chosen.backward_dq_from_ds) == (TileConfig(64, 64, 4, 2, tma=True),
                                                                     TileConfig(64, 64, 4, 3))
    assert chosen.backward_dq_delta == TileConfig(64, 32, 4, 3)
    not_faster = tuning.configs_from({**atomic, **stored})  # per head 0.25 < 0.26
    assert not_faster.backward_dkdv_ds is None and not_faster.backward_dq_from_ds is None
    assert not_faster.backward_per_head == TileConfig(32, 128, 8, 3)
    with_atomic = {**delta, **stored, "backward_atomic": trial("backward_atomic", "64x128x8x3", 0.24)}
    assert tuning.configs_from(with_atomic).backward_atomic is None  # 0.03 + 0.24 > 0.26
    one_of_two = tuning.configs_from({**delta, "backward_dq_from_ds": stored["backward_dq_from_ds"]})
    assert one_of_two.backward_dq_from_ds is None  # no dK/dV-storing tile timed: no stored-dS path


def test_a_wrong_result_is_never_timed(problem):
    problem.want["out"] = problem.want["out"] + 1.0  # every forward now disagrees with the reference
    trials = tuning.sweep(problem, ("forward", "backward_dq"), TINY, timer=fake_timer)
    forward = [t for t in trials if t.kernel == "forward"]
    assert forward and all(t.ms is None and t.note.startswith("wrong") for t in forward)
    assert tuning.configs_from(tuning.fastest(trials)) is None  # no forward, no table entry


def test_a_failing_config_is_recorded_not_raised(problem, monkeypatch):
    def out_of_resources(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(kernels, "backward_dq", out_of_resources)
    trials = tuning.sweep(problem, ("backward_dq",), TINY, timer=fake_timer)
    assert len(trials) == 1 and trials[0].ms is None and "out of resource" in trials[0].note
    bad = tuning.sweep(problem, ("forward",), {"forward": ("16x16",)}, timer=fake_timer)
    assert bad[0].ms is None and bad[0].note.startswith("TypeError")


def test_sweep_stops_at_the_deadline(problem):
    assert tuning.sweep(problem, candidates=TINY, timer=fake_timer, deadline=time.monotonic() - 1) == []


def test_measured_lookup_takes_the_nearest_sequence_class():
    table = {(90, 2, 128, 384): ("128x32x4x4", "32x128x8x3", "64x32x4x3", "64x128x8x2"),
             (90, 2, 128, 1 << 31): ("128x128x8x3", "32x128x8x3", "128x64x8x3", "32x128x8x3")}
    assert kernels.table_key(90, 80, torch.bfloat16, 257) == (90, 2, 128, 384)
    assert kernels.table_key(90, 32, torch.float16, 50) == (90, 2, 32, 128)
    assert kernels.measured_configs((90, 2, 128, 128), table).forward == TileConfig(128, 32, 4, 4)
    assert kernels.measured_configs((90, 2, 128, 1536), table).forward == TileConfig(128, 32, 4, 4)  # nearer, smaller
    assert kernels.measured_configs((90, 2, 128, 1 << 31), table).backward_dq == TileConfig(128, 64, 8, 3)
    assert kernels.measured_configs((90, 2, 64, 384), table) is None
    assert kernels.measured_configs((80, 2, 128, 384), table) is None
    five = {(90, 2, 64, 384): ("128x32x4x4", "32x64x4x3", "64x32x4x3", None, "64x32x4x3")}
    configs = kernels.measured_configs((90, 2, 64, 384), five)
    assert configs.backward_atomic is None and configs.backward_dq_delta == TileConfig(64, 32, 4, 3)
    six = {(90, 2, 64, 384): ("128x32x4x4", "32x64x4x3", "64x32x4x3", None, None, "32x128x8x3+tma")}
    configs = kernels.measured_configs((90, 2, 64, 384), six)
    assert configs.backward_dq_delta is None and configs.backward_per_head == TileConfig(32, 128, 8, 3, tma=True)
    eight = {(90, 2, 64, 384): ("128x32x4x4", "32x64x4x3", "64x32x4x3", None, None, None, "64x64x4x2+tma",
                                "64x64x4x3")}
    configs = kernels.measured_configs((90, 2, 64, 384), eight)
    assert configs.backward_per_head is None and configs.backward_dkdv_ds == TileConfig(64, 64, 4, 2, tma=True)
    assert configs.backward_dq_from_ds == TileConfig(64, 64, 4, 3)


def test_cpu_calls_use_the_portable_configs():
    q = torch.randn(1, 1, 300, 64)
    assert kernels.configs_for_call(q) == kernels.configs_for(64, torch.float32)


def test_every_shipped_entry_parses():
    from mimkernels.triton import attention_tiles

    for key, tiles in attention_tiles.MEASURED.items():
        assert len(key) == 4 and key[3] in kernels.SEQ_CLASSES
        assert kernels.measured_configs(key) is not None and len(tiles) in (4, 5, 6, 8)


def test_table_file_round_trip():
    measured = {(90, 2, 128, 384): ("128x32x4x4", "32x128x8x3", "64x32x4x3", "64x128x8x2")}
    provenance = {(90, 2, 128, 384): "NVIDIA H200, torch 2.11; aim_600m ..."}
    namespace = {}
    exec(tune_attention.table_text(measured, provenance), namespace)
    assert namespace["MEASURED"] == measured and namespace["PROVENANCE"] == provenance
    assert "GENERATED" in namespace["__doc__"]


def write_tune_csv(path, rows) -> None:
    """A tune_attention.csv at ``path`` with (shape, key text, kernel, config, ms, note) rows, one H200 run's
    provenance on each."""
    meta = "NVIDIA H200,2.11.0,3.6.0,abc1234,2026-11-27"
    path.write_text("\n".join([",".join(tune_attention.CSV_FIELDS)] + [
        f"{shape},\"{key}\",{kernel},{config},{ms},1e-3,{note},{meta}" for shape, key, kernel, config, ms, note
        in rows]) + "\n")


def test_table_rebuilt_from_a_raw_csv(tmp_path):
    """--from-csv: the fastest correct config per kernel; a failed or wrong trial never wins; no GPU needed."""
    path = tmp_path / "tune_attention.csv"
    write_tune_csv(path, [("aim_600m", "(90, 2, 128, 384)", *row) for row in [
        ("forward", "64x64x4x3", "0.10", ""), ("forward", "128x32x4x4", "", "wrong: relative error 1"),
        ("backward_dkdv", "64x64x4x2", "0.17", ""), ("backward_dkdv", "32x64x4x3", "0.20", ""),
        ("backward_dq", "64x32x4x3", "0.11", ""), ("backward_atomic", "64x128x8x3", "0.32", ""),
        ("backward_per_head", "32x128x8x3", "0.27", "")]])
    [(key, line, value, source, recorded)] = tune_attention.entries_from_csv(str(path))
    # measured under the classes of its day (N 256 in the class up to 384), keyed by today's (up to 256)
    assert recorded == (90, 2, 128, 384) and key == (90, 2, 128, 256)
    # atomic 0.32 ms > per-head 0.27 < dK/dV + dQ 0.17 + 0.11
    assert value == ("64x64x4x3", "64x64x4x2", "64x32x4x3", None, None, "32x128x8x3", None, None)
    assert "NVIDIA H200" in source and "abc1234" in source and "aim_600m" in line


def test_sweep_option_times_the_other_kernels_at_the_tables_tiles(tmp_path):
    """--sweep: the named kernels' candidates at each shape, every other kernel only at the tile the table's entry
    for the shape's key gives it (none where it gives none), the row dot as always; a key without an entry is swept
    whole. A CSV of such a run says so in the provenance of the entry rebuilt from it."""
    entry = ("128x32x4x4+tma", "64x64x4x2+tma", "128x32x4x3+tma", None, "64x32x4x3", None)
    table = {(90, 2, 128, 256): entry}
    swept = tuning.STORED_DS_KERNELS
    full = tune_attention.shape_candidates("aim_600m", 90, torch.bfloat16)
    assert full == tuning.candidates_for(256, head_dim=128, arch=90)
    partial = tune_attention.shape_candidates("aim_600m", 90, torch.bfloat16, swept, table)
    assert partial == {**{kernel: () for kernel in tuning.KERNELS}, "forward": ("128x32x4x4+tma",),
                       "backward_dkdv": ("64x64x4x2+tma",), "backward_dq": ("128x32x4x3+tma",),
                       "backward_dq_delta": ("64x32x4x3",), "backward_row_dot": full["backward_row_dot"],
                       **{kernel: full[kernel] for kernel in swept}}
    assert tune_attention.shape_candidates("vit_b", 90, torch.bfloat16, swept, table) == \
        tuning.candidates_for(197, head_dim=64, arch=90)  # no entry for D 64: everything
    with pytest.raises(SystemExit):
        tune_attention.main(["--from-csv", "x.csv", "--sweep", "backward_dkdv_ds"])
    path = tmp_path / "tune_attention.csv"
    write_tune_csv(path, [("aim_600m", "(90, 2, 128, 256)", *row) for row in [
        ("forward", "64x64x4x3", "0.10", tune_attention.AT_TABLE_TILE),
        ("backward_dkdv", "64x64x4x2", "0.17", tune_attention.AT_TABLE_TILE),
        ("backward_dq", "64x32x4x3", "0.11", tune_attention.AT_TABLE_TILE),
        ("backward_row_dot", "16x0x4x3", "0.03", ""),
        ("backward_dkdv_ds", "64x64x4x2+tma", "0.15", ""), ("backward_dq_from_ds", "64x64x4x3", "0.05", "")]])
    [(_, _, value, source, _)] = tune_attention.entries_from_csv(str(path))
    assert value[6:] == ("64x64x4x2+tma", "64x64x4x3")  # 0.23 ms against 0.31
    assert "backward_dkdv backward_dq forward timed at the table's tiles only (--sweep)" in source


@pytest.mark.parametrize("swept, in_table", [(None, True), (tuning.STORED_DS_KERNELS, True),
                                             (tuning.STORED_DS_KERNELS, False)],
                         ids=["whole", "sweep_stored_ds", "sweep_without_an_entry"])
def test_tune_main_on_a_stand_in_gpu(swept, in_table, tmp_path, monkeypatch):
    """tune_attention's GPU path end to end through the interpreter (a tiny shape under aim_600m's name, tiny
    candidates, a fake timer that makes the stored-dS tiles fastest, no compile workers): every trial in the CSV, the
    table entry written under the shape's key with the fastest tiles, and with --sweep the other kernels timed at the
    table's tiles only, which the CSV's notes and the entry's provenance say (a shape without an entry: swept
    whole, and said so by neither)."""
    import csv

    name, key = "aim_600m", (90, 2, 16, 128)
    monkeypatch.setitem(tune_attention.SHAPES, name, (2, 1, 40, 16, "random"))
    monkeypatch.setattr(tuning, "CANDIDATES", TINY)
    entry = ("16x16x4x1", "16x16x4x1", "16x16x4x1", None, "32x16x4x1", None)
    monkeypatch.setattr(tune_attention.attention_tiles, "MEASURED", {key: entry} if in_table else {})
    monkeypatch.setattr(tune_attention.attention_tiles, "PROVENANCE", {key: "before"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "stand-in GPU")
    monkeypatch.setattr(kernels, "_arch", lambda device: 90)
    make_problem = tuning.make_problem
    monkeypatch.setattr(tuning, "make_problem", lambda *args, **kw: make_problem(*args, **kw, device="cpu"))

    fast = {"backward_row_dot": 0.01, "backward_dkdv_ds": 0.01, "backward_dq_from_ds": 0.01}  # the rest: 1 ms
    sweep = tuning.sweep

    def stand_in_sweep(problem, kernels_to_tune=tuning.KERNELS, candidates=None, timer=None, on_trial=None, **kw):
        def timed(t):
            return tuning.Trial(t.kernel, t.config, t.ms and fast.get(t.kernel, t.ms), t.error, t.note)

        trials = sweep(problem, kernels_to_tune, candidates, timer=lambda fn: (fn(), 1.0)[1],
                       on_trial=lambda t: on_trial(timed(t)), **kw)
        return [timed(t) for t in trials]

    monkeypatch.setattr(tuning, "sweep", stand_in_sweep)
    written = {}
    monkeypatch.setattr(tune_attention, "write_table", lambda measured, provenance: written.update(
        measured=measured, provenance=provenance))
    argv = ["--shapes", name, "--dtype", "fp16", "--workers", "0", "--out", str(tmp_path), "--write-table"]
    assert tune_attention.main(argv + (["--sweep", *swept] if swept else [])) == 0
    rows = list(csv.DictReader(open(tmp_path / "tune_attention.csv")))
    timed = {(r["kernel"], r["config"]) for r in rows if r["ms"]}
    if swept and in_table:
        want = {("forward", "16x16x4x1"), ("backward_dkdv", "16x16x4x1"), ("backward_dq", "16x16x4x1"),
                ("backward_dq_delta", "32x16x4x1"), ("backward_row_dot", "16x0x4x3")}
        want |= {(kernel, text) for kernel in swept for text in TINY[kernel]}
        assert {(r["kernel"], r["config"]) for r in rows} == want and timed == want
        assert {r["kernel"] for r in rows if r["note"] == tune_attention.AT_TABLE_TILE} == {
            "forward", "backward_dkdv", "backward_dq", "backward_dq_delta"}
        assert "swept backward_dkdv_ds backward_dq_from_ds" in written["provenance"][key]
    else:
        assert timed == {(kernel, text) for kernel, texts in TINY.items() for text in texts}
        assert not any(r["note"] for r in rows) and "swept" not in written["provenance"][key]
    assert written["measured"][key][6:] == ("16x32x4x1", "16x16x4x1")  # the stored-dS path, fastest
    assert written["provenance"][key].startswith("stand-in GPU, torch ")


def test_rebuilding_moves_an_entry_to_its_current_class(tmp_path, monkeypatch):
    """--from-csv --write-table: the shape's entry under its old key goes, other shapes' entries stay."""
    path = tmp_path / "tune_attention.csv"
    write_tune_csv(path, [("aim_600m", "(90, 2, 128, 384)", kernel, config, "0.1", "") for kernel, config in [
        ("forward", "64x64x4x3"), ("backward_dkdv", "64x64x4x2"), ("backward_dq", "64x32x4x3")]])
    old = ("128x32x4x4", "32x128x8x3", "64x32x4x3")
    monkeypatch.setattr(tune_attention.attention_tiles, "MEASURED", {(90, 2, 128, 384): old, (90, 2, 64, 384): old})
    monkeypatch.setattr(tune_attention.attention_tiles, "PROVENANCE", {
        (90, 2, 128, 384): "H200; aim_600m B64 H12 N256 D128 random: ...", (90, 2, 64, 384): "H200; vit_b B256 ..."})
    written = {}
    monkeypatch.setattr(tune_attention, "write_table", lambda measured, provenance: written.update(measured))
    assert tune_attention.main(["--from-csv", str(path), "--write-table"]) == 0
    assert written == {(90, 2, 128, 256): ("64x64x4x3", "64x64x4x2", "64x32x4x3", None, None, None, None, None),
                       (90, 2, 64, 384): old}


def test_compare_with_an_older_table_prices_both_picks_by_the_csv(tmp_path, capsys):
    """--compare-with: per shape, the CSV's times of each table's kernels along the backward path it runs."""
    path = tmp_path / "tune_attention.csv"
    write_tune_csv(path, [(shape, "(90, 2, 128, 256)", kernel, config, ms, "") for shape, kernel, config, ms in [
        ("aim_600m", "forward", "64x64x4x3", "0.10"), ("aim_600m", "forward", "128x32x4x4", "0.08"),
        ("aim_600m", "backward_row_dot", "16x0x4x3", "0.03"), ("aim_600m", "backward_dkdv", "64x64x4x2", "0.17"),
        ("aim_600m", "backward_dq", "64x32x4x3", "0.11"), ("aim_600m", "backward_dq_delta", "64x32x4x3", "0.12"),
        ("vit_b", "forward", "64x64x4x3", "0.2")]])
    old = {(90, 2, 128, 256): ("64x64x4x3", "64x64x4x2", "64x32x4x3")}  # row dot + dK/dV + dQ: 0.31 ms
    new = {(90, 2, 128, 256): ("128x32x4x4", "64x64x4x2", "64x32x4x3", None, "64x32x4x3", None)}  # 0.29 ms
    header, aim, vit_b = tune_attention.compare_lines(str(path), old, new)
    assert aim.split() == ["aim_600m", "0.1000", "0.0800", "0.3100", "0.2900", f"{0.41 / 0.37:.3f}x"]
    assert vit_b.startswith("vit_b") and "not compared" in vit_b  # D 64: neither table has an entry
    old_file = tmp_path / "old_tiles.py"
    old_file.write_text(tune_attention.table_text(old, {}))
    assert tune_attention.load_table(str(old_file)) == old
    assert tune_attention.main(["--from-csv", str(path), "--compare-with", str(old_file)]) == 0  # table untouched
    assert aim in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit):  # the comparison needs a CSV's timings
        tune_attention.main(["--compare-with", str(old_file)])
    # the stored-dS path: row dot + dK/dV storing dS + dQ from dS, 0.03 + 0.18 + 0.05 ms
    with open(path, "a") as f:
        f.write("aim_600m,\"(90, 2, 128, 256)\",backward_dkdv_ds,64x64x4x2+tma,0.18,1e-3,,H200,2.11,3.6,abc1234,x\n"
                "aim_600m,\"(90, 2, 128, 256)\",backward_dq_from_ds,64x64x4x3,0.05,1e-3,,H200,2.11,3.6,abc1234,x\n")
    stored = {(90, 2, 128, 256): (*new[90, 2, 128, 256][:3], None, None, None, "64x64x4x2+tma", "64x64x4x3")}
    _, aim_stored, _ = tune_attention.compare_lines(str(path), new, stored)
    assert aim_stored.split() == ["aim_600m", "0.0800", "0.0800", "0.2900", "0.2600", f"{0.37 / 0.34:.3f}x"]


def test_runtime_autotune_runs_once_per_shape_class(monkeypatch):
    """MIMKERNELS_AUTOTUNE=1 on a GPU the table lacks: one sweep for the shape class, then the cached result."""
    found = AttentionConfigs(*(TileConfig.parse(c) for c in ("16x16x4x1",) * 4))
    calls = []
    monkeypatch.setenv("MIMKERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(kernels, "_arch", lambda device: 75)  # a GPU the table has no entry for
    monkeypatch.setattr(kernels, "_CALL_CONFIGS", {})
    monkeypatch.setattr(kernels, "_RUNTIME_TUNED", {})
    monkeypatch.setattr(kernels.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "tune_call_shape", lambda q: calls.append(q.shape) or found)
    for seq_len in (260, 300, 300):  # one sequence class
        assert kernels.configs_for_call(torch.empty(2, 3, seq_len, 64, dtype=torch.bfloat16)) is found
    assert calls == [(2, 3, 260, 64)]
    monkeypatch.setenv("MIMKERNELS_AUTOTUNE", "0")
    assert kernels.configs_for_call(torch.empty(2, 3, 1000, 64, dtype=torch.bfloat16)) == \
        kernels.configs_for(64, torch.bfloat16)  # not enabled: the portable configs


def test_runtime_autotune_waits_out_a_cuda_graph_capture(monkeypatch):
    """Inside a capture no sweep runs and the portable stand-in is not cached: the first call after it tunes."""
    found = AttentionConfigs(*(TileConfig.parse(c) for c in ("16x16x4x1",) * 4))
    capturing = [True]
    monkeypatch.setenv("MIMKERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(kernels, "_arch", lambda device: 75)
    monkeypatch.setattr(kernels, "_CALL_CONFIGS", {})
    monkeypatch.setattr(kernels, "_RUNTIME_TUNED", {})
    monkeypatch.setattr(kernels.torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(tuning, "tune_call_shape", lambda q: found)
    q = torch.empty(2, 3, 200, 64, dtype=torch.bfloat16)
    assert kernels.configs_for_call(q) == kernels.configs_for(64, torch.bfloat16)
    capturing[0] = False
    assert kernels.configs_for_call(q) is found

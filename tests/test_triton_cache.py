"""benchmarks/triton_cache.py: kernels compiled here for a Hopper GPU that is not here, found by Triton's own cache
lookup after the archive is unpacked elsewhere (no GPU needed).

The compiles run in subprocesses: the compiler, not the interpreter, must see the kernels, and this session's
TRITON_INTERPRET=1 has already replaced them.
"""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import triton_cache

ROOT = Path(__file__).resolve().parents[1]
# a few of the tuner's jobs, one bench provider, at the MAE encoder's shape: forward, row dot, dK/dV, dQ kernels
TUNE_JOBS = 3


def compiled(code: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), "TRITON_CACHE_DIR": str(cache_dir)}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run


WARM = f"""
from benchmarks import triton_cache
jobs = triton_cache.jobs_for(["tune", "bench"], ["mae_encoder"], ["mae_encoder"], [])
jobs = jobs[:{TUNE_JOBS}] + [job for job in jobs if job[0] == "bench"][:1]
raise SystemExit(triton_cache.warm(%r, jobs, workers=1, wheel=None, parts=["tune", "bench"]))
"""
# the same jobs again, in the process, with a listener on Triton's compile: how many compiles, how many cache hits
RERUN = f"""
import triton
from benchmarks import triton_cache
triton_cache.pretend_hopper(None)
hits = []
triton.knobs.compilation.listener = lambda **event: hits.append(event["cache_hit"])
jobs = triton_cache.jobs_for(["tune", "bench"], ["mae_encoder"], ["mae_encoder"], [])
for job in jobs[:{TUNE_JOBS}] + [job for job in jobs if job[0] == "bench"][:1]:
    triton_cache.run_job(job)
print("compiles", len(hits), "hits", sum(hits))
"""


def test_warm_kernels_are_cache_hits_where_unpacked(tmp_path):
    """The kernels ``warm`` compiles (pretending an sm_90 GPU, on CPU tensors) are packed; unpacked into another
    cache folder (Triton's group files hold absolute paths, which unpack rewrites), every compile of the same jobs
    finds its kernel there: the keys ``warm`` made are the ones the same code computes at its launches."""
    archive = tmp_path / "sm90.tar.xz"
    run = compiled(WARM % str(archive), tmp_path / "unused")
    assert "0 jobs failed" in run.stdout, run.stdout
    with tarfile.open(archive) as packed:
        manifest = json.load(packed.extractfile(triton_cache.MANIFEST))
        names = [member.name for member in packed.getmembers() if member.isfile()]
    assert manifest["entries"] >= 4 and manifest["target"] == "cuda sm_90" and manifest["failed_jobs"] == 0
    assert all(name.endswith((".cubin", ".json")) for name in names)  # binaries and metadata only
    cache = tmp_path / "cache"
    line = triton_cache.unpack(str(archive), str(cache))
    assert f"{manifest['entries']} of {manifest['entries']} kernels added" in line
    assert "made for this Triton: yes" in line
    assert "unpacked into" in triton_cache.unpack(str(archive), str(cache))  # a second time: nothing to do
    rerun = compiled(RERUN, cache)
    compiles, hits = (int(word) for word in rerun.stdout.split()[-3::2])
    assert compiles == hits >= manifest["entries"], rerun.stdout
    assert triton_cache.report(str(cache)).startswith(f"Triton cache {cache}: 0 kernels compiled on this machine")


# one gpu test whose backward kernels come after a check that a skipped launch fails (its outputs are never written)
GPU_TEST = "tests/test_tokens_gpu.py::test_mae_encoder_and_decoder_path[33-torch.float32-triton]"


def test_gpu_tests_compile_their_kernels_past_their_checks(tmp_path):
    """``--parts tests``: a ``gpu`` test runs on CPU tensors under a pretend sm_90 GPU (not skipped), goes on past the
    checks its skipped launches fail (python -O, assert_close off: its forward and backward kernels, 5 here; 3 with
    the checks on), and what it compiled is packed; unpacked into another folder, the same test compiles nothing."""
    archive = tmp_path / "sm90.tar.xz"
    warm = (f"from benchmarks import triton_cache\nraise SystemExit(triton_cache.warm({str(archive)!r}, [], 1, None, "
            f"['tests'], [{GPU_TEST!r}]))")
    run = compiled(warm, tmp_path / "unused")
    assert "warm: gpu tests: 1 passed" in run.stdout, run.stdout
    with tarfile.open(archive) as packed:
        manifest = json.load(packed.extractfile(triton_cache.MANIFEST))
    assert manifest["entries"] >= 5 and manifest["parts"] == ["tests"], manifest
    assert manifest["gpu_tests"].startswith("1 passed"), manifest
    cache = tmp_path / "cache"
    line = triton_cache.unpack(str(archive), str(cache))
    assert f"{manifest['entries']} of {manifest['entries']} kernels added" in line
    again = compiled("from benchmarks import triton_cache\n"
                     f"print(triton_cache.warm_gpu_tests([{GPU_TEST!r}], 1, None))", cache)
    assert "(0, '1 passed" in again.stdout, again.stdout
    assert triton_cache.report(str(cache)).startswith(f"Triton cache {cache}: 0 kernels compiled on this machine")


def _archive(path: Path, manifest: dict, members: dict) -> None:
    with tarfile.open(path, "w:xz") as archive:
        for name, data in {**members, triton_cache.MANIFEST: json.dumps(manifest).encode()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_unpack_says_which_key_part_differs(tmp_path):
    """An archive made for another Triton build (here: another triton_key) is unpacked, and the line says that its
    kernels will not be found and which part of the key differs."""
    manifest = {**triton_cache.key_parts(), "entries": 1, "triton_key_sha256": "0" * 64}
    group = {"child_paths": {"k.json": "/elsewhere/abc/k.json", "k.cubin": "/elsewhere/abc/k.cubin"}}
    _archive(tmp_path / "a.tar.xz", manifest, {"abc/k.json": b"{}", "abc/k.cubin": b"\0",
                                              "abc/__grp__k.json": json.dumps(group).encode()})
    line = triton_cache.unpack(str(tmp_path / "a.tar.xz"), str(tmp_path / "cache"))
    assert "1 of 1 kernels added" in line and "made for this Triton: NO" in line
    assert "triton_key_sha256 (archive '000" in line and "ptxas" not in line
    written = json.loads((tmp_path / "cache" / "abc" / "__grp__k.json").read_text())
    assert written["child_paths"] == {name: str(tmp_path / "cache" / "abc" / name) for name in ("k.json", "k.cubin")}


def test_unpack_leaves_out_a_kernel_it_cannot_load(tmp_path):
    """An entry without its binary (or its group file) is not written: Triton would take a group whose metadata it
    finds as a cache hit and fail to load it; left out, the kernel is compiled as if nothing were carried."""
    group = json.dumps({"child_paths": {"k.json": "/x/abc/k.json", "k.cubin": "/x/abc/k.cubin"}}).encode()
    members = {"abc/k.json": b"{}", "abc/__grp__k.json": group,  # no abc/k.cubin
               "def/k.json": b"{}", "def/k.cubin": b"\0",  # no group file
               "ghi/k.json": b"{}", "ghi/k.cubin": b"\0", "ghi/__grp__k.json": group}
    _archive(tmp_path / "a.tar.xz", {**triton_cache.key_parts(), "entries": 3}, members)
    line = triton_cache.unpack(str(tmp_path / "a.tar.xz"), str(tmp_path / "cache"))
    assert "1 of 3 kernels added" in line
    assert sorted(path.name for path in (tmp_path / "cache").iterdir() if path.is_dir()) == ["ghi"]


def test_report_names_and_packs_what_this_machine_compiled(tmp_path):
    """After the steps, report counts the cache's kernels that were not carried in, by kernel name (what the carried
    archive lacked), and packs those alone, ready to be carried by the next call."""
    group = json.dumps({"child_paths": {"k.json": "/x/abc/k.json", "k.cubin": "/x/abc/k.cubin"}}).encode()
    _archive(tmp_path / "a.tar.xz", {**triton_cache.key_parts(), "entries": 1},
             {"abc/k.json": b'{"name": "_carried_kernel"}', "abc/k.cubin": b"\0", "abc/__grp__k.json": group})
    cache = tmp_path / "cache"
    triton_cache.unpack(str(tmp_path / "a.tar.xz"), str(cache))
    for entry in ("def", "ghi"):  # as Triton leaves a kernel it compiled: its files, its group file
        (cache / entry).mkdir()
        (cache / entry / "k.json").write_text('{"name": "_rows_backward"}')
        (cache / entry / "k.cubin").write_bytes(b"\0")
        (cache / entry / "k.source").write_text("the kernel's source")
        (cache / entry / "__grp__k.json").write_text(json.dumps({"child_paths": {
            name: str(cache / entry / name) for name in ("k.json", "k.cubin", "k.source")}}))
    line = triton_cache.report(str(cache), str(tmp_path / "here.tar.xz"))
    assert "2 kernels compiled on this machine, 1 carried in" in line and ": _rows_backward 2;" in line
    assert f"packed into {tmp_path / 'here.tar.xz'}" in line
    with tarfile.open(tmp_path / "here.tar.xz") as packed:
        names = sorted(member.name for member in packed.getmembers() if member.isfile())
    assert names == [f"{entry}/{name}" for entry in ("def", "ghi") for name in ("__grp__k.json", "k.cubin", "k.json")] \
        + [triton_cache.MANIFEST]
    again = triton_cache.unpack(str(tmp_path / "here.tar.xz"), str(tmp_path / "next"))  # the next call's unpack
    assert "2 of 2 kernels added" in again


@pytest.mark.parametrize("name", ["../evil/k.cubin", "abc/../../k.cubin", "k.cubin", "abc/sub/k.cubin"])
def test_unpack_refuses_paths_outside_an_entry(tmp_path, name):
    _archive(tmp_path / "a.tar.xz", {**triton_cache.key_parts(), "entries": 1}, {name: b"\0"})
    with pytest.raises(ValueError, match="unexpected path"):
        triton_cache.unpack(str(tmp_path / "a.tar.xz"), str(tmp_path / "cache"))
    assert not (tmp_path / "evil").exists() and not (tmp_path / "k.cubin").exists()


def test_triton_key_of_this_install_is_tritons_own():
    """The key of another Triton build (the GPU machine's wheel) is Triton's own function run over that build's
    files: over this install's files it gives this Triton's key."""
    import triton
    import triton.runtime.cache as cache

    site = Path(triton.__file__).resolve().parents[1]
    assert triton_cache.triton_key_of(str(site)) == cache.triton_key()


MLP_JOB = """
import triton
from benchmarks import triton_cache
from mimkernels.triton import mlp
triton_cache.pretend_hopper(None)
compiled = []
triton.knobs.compilation.listener = lambda **event: compiled.append(
    (event["metadata"]["name"], event["metadata"]["num_warps"], event["metadata"]["num_stages"]))
triton_cache.run_job(("mlp", "aim_600m", %d))
print(sorted(set(compiled)), "tile", tuple(mlp.CANDIDATES[%d]))
"""


def test_mlp_job_compiles_a_swept_tile_in_both_gemms(tmp_path):
    """The models part's bench_mlp --sweep job: the candidate tile's forward (fc1 + GELU) and backward (fc2's input
    gradient) kernels, both with the tile's warps and stages."""
    tile = 2
    run = compiled(MLP_JOB % (tile, tile), tmp_path / "cache")
    kernels, _, candidate = run.stdout.strip().splitlines()[-1].partition(" tile ")
    warps, stages = eval(candidate)[4:6]  # noqa: S307 (a tuple this test printed)
    assert eval(kernels) == [("_linear_gelu_fwd", warps, stages), ("_matmul_gelu_grad", warps, stages)]  # noqa: S307


MIM_OPS_JOBS = """
import json
import triton
from benchmarks import triton_cache
triton_cache.pretend_hopper(None)
compiled = []
def listen(src, metadata, **event):  # each compile: the kernel and its constexprs by name
    names = src.fn.arg_names
    compiled.append([metadata["name"], {names[key[0]]: value for key, value in src.constants.items()
                                        if isinstance(value, (bool, int))}])
triton.knobs.compilation.listener = listen
jobs = triton_cache.jobs_for(["mim_ops"], [], [], [])
print(json.dumps(jobs))
for job in jobs[:1] + jobs[-1:]:
    compiled.clear()
    triton_cache.run_job(tuple(job))
    print(json.dumps(compiled))
"""


def test_mim_ops_jobs_compile_each_benchmarked_kernel(tmp_path):
    """The ``mim_ops`` part (gpu_session's step of that name): bench_tokens' providers of ours, the fused one-pass
    backward included, and bench_patch_embed's, each patch-embedding mode (kept ids for MAE, mask for SimMIM) and the
    loss at 1 and at GROUPED_PATCHES patches per program, forward and backward."""
    from benchmarks import bench_patch_embed, bench_tokens

    jobs, tokens, patch_embed = (json.loads(line) for line in
                                 compiled(MIM_OPS_JOBS, tmp_path / "cache").stdout.strip().splitlines()[-3:])
    assert jobs == ([["tokens", name] for name in bench_tokens.SHAPES]
                    + [["patch_embed", name] for name in bench_patch_embed.SHAPES])
    assert {name for name, _ in tokens} == {"_gather_rows", "_restore_rows", "_rows_backward"}
    embed_modes = {(constants["HAS_IDS"], constants["HAS_MASK"]) for name, constants in patch_embed
                   if name == "_patch_embed_fwd"}
    assert embed_modes == {(False, False), (True, False), (False, True)}
    assert "_patch_embed_weight_grad" in {name for name, _ in patch_embed}
    for kernel in ("_masked_patch_loss_fwd", "_masked_patch_loss_bwd"):
        groups = {constants["GROUP"] for name, constants in patch_embed if name == kernel}
        assert groups == {1, bench_patch_embed.GROUPED_PATCHES}, (kernel, patch_embed)


KERNEL_MODULES = ("attention", "attention_tiles", "launch", "losses", "mlp", "norms", "patch_embed", "tokens")
# every Triton function's cache key, computed in a fresh process in definition order or in reverse
CACHE_KEYS = """
import importlib, json
from triton.runtime.jit import JITFunction
functions = [obj for name in %r for obj in vars(importlib.import_module("mimkernels.triton." + name)).values()
             if isinstance(obj, JITFunction) and obj.fn.__module__ == "mimkernels.triton." + name]
for function in (functions[::-1] if %r else functions):
    function.cache_key
print(json.dumps({f"{function.fn.__module__}.{function.fn.__name__}": function.cache_key for function in functions}))
"""


def _triton_functions() -> dict:
    """{"module.name": the Python function} of every Triton function of mimkernels (compiled or interpreted)."""
    import importlib

    from triton.runtime.jit import KernelInterface

    functions = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module("mimkernels.triton." + name)
        functions |= {f"{name}.{obj.fn.__name__}": obj.fn for obj in vars(module).values()
                      if isinstance(obj, KernelInterface) and obj.fn.__module__ == module.__name__}
    return functions


def _global_values_read(function) -> set[str]:
    """The module-level values (constants, not functions or modules) a function's own body reads by name."""
    import ast
    import inspect
    import textwrap

    import triton.language as tl

    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    names = [node for node in ast.walk(tree) if isinstance(node, ast.Name)]
    local = {arg.arg for arg in ast.walk(tree) if isinstance(arg, ast.arg)}
    local |= {node.id for node in names if isinstance(node.ctx, ast.Store)}
    scope = function.__globals__
    return {node.id for node in names if isinstance(node.ctx, ast.Load) and node.id not in local
            and isinstance(scope.get(node.id), (bool, int, float, str, tuple, tl.constexpr))}


def test_kernel_cache_keys_do_not_depend_on_what_compiled_first(tmp_path):
    """Triton up to 3.8 (3.6 is the GPU machine's) adds a called function's module-level constants to its caller's
    cache key only when the callee's key was computed earlier in the process (made order-free upstream in
    triton-lang/triton#10494): a helper that reads one gives the kernels that call it a key that depends on what
    ran before, so a kernel compiled here could miss on the GPU. So no helper (a Triton function that another one
    calls) reads a module-level value, the kernels pass it down; and every key is the same computed in either
    order."""
    import inspect

    functions = _triton_functions()
    sources = {name: inspect.getsource(function) for name, function in functions.items()}
    helpers = [name for name, function in functions.items()
               if any(f"{function.__name__}(" in source for caller, source in sources.items() if caller != name)]
    assert len(helpers) > 20, helpers
    read = {name: sorted(_global_values_read(functions[name])) for name in helpers}
    assert {name: values for name, values in read.items() if values} == {}
    # the check sees such a read: a kernel's, which it passes to _dkdv_key_tile
    assert _global_values_read(functions["attention._prefix_causal_bwd_dkdv"]) == {"KEY_CENTRE_ROWS"}
    defined, reversed_ = (json.loads(compiled(CACHE_KEYS % (KERNEL_MODULES, backwards), tmp_path).stdout)
                          for backwards in (False, True))
    assert len(defined) == len(functions) and defined == reversed_


def test_warm_refuses_a_wheel_of_another_triton(tmp_path):
    import zipfile

    import triton

    wheel = tmp_path / "triton-0.1-cp312-cp312-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("triton-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: triton\nVersion: 0.1\n")
    with pytest.raises(SystemExit, match=f"holds Triton 0.1; this is {triton.__version__}"):
        triton_cache.triton_key_of_wheel(str(wheel))

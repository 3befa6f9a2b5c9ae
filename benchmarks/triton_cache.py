"""Triton's compile cache for a lent Hopper GPU, filled on a machine without one: device time goes to measuring.

A GPU session has 15 minutes of device time, and compiling took much of it: run 10's tune step spent 113 of its 245 s
compiling 707 kernels (on 16 cores), and its sanitizer step ran out of 90 s compiling. Triton compiles for a
target it is told (kernel_report does, for its spill check), and its on-disk cache is keyed by what decides the
binary: Triton's own build, the kernel's source, its specialisation (argument dtypes, 16-byte alignment, ints equal to
1 or divisible by 16, constexprs), the target, the options, the ptxas version. So ``warm`` runs the code that the next
GPU session runs (the tuner's precompile jobs, bench_attention's providers of ours, the sanitizer cases, the MIM
ops' benchmarks, the models step's kernel benchmarks and two blocks of its models, and the ``gpu`` tests with their
checks switched off: benchmarks/pretend_gpu_tests.py) on CPU tensors, with Triton told that the current device is
an sm_90 GPU and every launch skipped: each kernel is compiled with the specialisation it gets on the GPU, and lands
in the cache under the key the GPU computes. ``unpack``
(benchmarks/gpu_env.sh, on the GPU machine) puts the archive into that machine's cache; a kernel whose key matches
is loaded instead of compiled, one that does not is compiled there as before.
Nothing is trusted that Triton does not check itself: a cached binary is found only under the hash of everything
that made it.

What the key needs to match (``unpack`` checks and says which differs): the same Triton release built for the GPU
machine's Python (its ``libtriton`` is part of the key: ``--wheel`` names that wheel, e.g. cp312, when this machine's
Python differs), the ptxas bundled with it (no TRITON_PTXAS_PATH there), and no cache-invalidating environment
variable (TRITON_*/MLIR_*/LLVM_* debug switches). Run with the GPU machine's Triton (3.6; ``make triton-cache`` uses
.venv-floor) and TRITON_INTERPRET unset:

    python -m benchmarks.triton_cache warm --out benchmarks/.triton-cache/sm90.tar.xz [--wheel TRITON_WHEEL]
        [--parts tune bench sanitizer mim_ops models tests] [--tune-shapes aim_600m ...] [--workers 2]
    python -m benchmarks.triton_cache unpack benchmarks/.triton-cache/sm90.tar.xz   # on the GPU machine
    python -m benchmarks.triton_cache report [--pack OUT.tar.xz]   # on the GPU machine, after its steps: compiled
        there (by kernel name; packed: the next session carries them too) against carried

The archive holds each kernel's cubin and metadata only (TRITON_STORE_BINARY_ONLY, about 15 KB a kernel after xz)
and a manifest of what it was made for. The device tool carries it where ``carry`` names benchmarks/.triton-cache
(ignored by git: binaries, remade by one command after a kernel changes).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import inspect
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile

MANIFEST = "mimkernels-triton-cache.json"
# what a cache hit reads: the group file, the metadata, the binary (TRITON_STORE_BINARY_ONLY still writes the Python
# source beside them since 3.6; the group files of the archive name only what it holds)
KEPT = (".json", ".cubin")
CARRIED = ".mimkernels-carried.json"  # in the cache folder: the archives unpacked there, the entries they put there
PARTS = ("tune", "bench", "sanitizer", "mim_ops", "models", "tests")
MODEL_SHAPES = ("mae_vit_l", "aim_600m")  # bench_models' shapes of the steps_mae / steps_aim steps
MODEL_PROVIDERS = ("mimkernels", "mimkernels_views", "mimkernels_fused_norm", "mimkernels_fused_mlp")
# Hopper's shared memory per block (H100 and H200 alike, 227 KiB): a kernel that needs more fails on the GPU
HOPPER_SHARED_BYTES = 232448
# The batch the bench and model jobs run at: ints that count rows of the whole batch keep their divisibility by 16
# (what Triton specialises on) when the real batch is a multiple of 16; a smaller real batch is used as it is.
WARM_BATCH = 16


# ----------------------------------------------------------------------------- the key of the GPU machine's Triton

def triton_key_of(root: str) -> str:
    """Triton's ``triton_key()`` (the part of every cache key that names Triton's build) computed over the Triton
    package installed under ``root`` (a site-packages folder, or an unpacked wheel): Triton's own function, run with
    its paths pointing there."""
    import triton
    import triton.runtime.cache as cache

    namespace = {"__file__": os.path.join(root, "triton", "runtime", "cache.py"), "os": os, "hashlib": hashlib,
                 "sysconfig": sysconfig, "functools": functools, "__version__": triton.__version__}
    exec(inspect.getsource(cache.triton_key), namespace)  # noqa: S102  (Triton's source, not input)
    return namespace["triton_key"]()


def triton_key_of_wheel(wheel: str) -> str:
    """:func:`triton_key_of` the Triton in ``wheel`` (its version must be this Triton's)."""
    import triton

    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as root:
        metadata = next((name for name in archive.namelist() if name.endswith(".dist-info/METADATA")), None)
        lines = archive.read(metadata).decode().splitlines() if metadata else []
        version = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Version:")), None)
        if version != triton.__version__:
            raise SystemExit(f"--wheel {wheel} holds Triton {version}; this is {triton.__version__}: compile with "
                             f"the Triton of the wheel (the GPU machine's)")
        archive.extractall(root, [name for name in archive.namelist() if name.startswith("triton/")])
        return triton_key_of(root)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def key_parts() -> dict:
    """This machine's values of what a cache key holds besides the kernel: Triton's build, ptxas, environment."""
    import triton
    import triton.runtime.cache as cache

    parts = {"triton": triton.__version__, "triton_key_sha256": _sha(cache.triton_key())}
    try:  # where Triton has them (3.6-3.9): each is part of the key
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.backends.nvidia.compiler import get_ptxas_version

        parts |= {"ptxas": get_ptxas_version(90).strip().splitlines()[-1], "env": get_cache_invalidating_env_vars()}
    except (ImportError, AttributeError, OSError) as error:
        parts |= {"ptxas": f"unknown ({type(error).__name__})", "env": "unknown"}
    return parts


# ----------------------------------------------------------------------------- compiling for a GPU that is not here

class _HopperUtils:
    def get_device_properties(self, device):
        return {"max_shared_mem": HOPPER_SHARED_BYTES, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads per block


class PretendHopper:
    """Triton's active driver during ``warm``: device 0 is an sm_90 GPU, and a launch does nothing."""

    def __init__(self):
        self.utils = _HopperUtils()
        self.launcher_cls = lambda src, metadata: (lambda *args, **kwargs: None)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def pretend_hopper(triton_key: str | None) -> None:
    """Compile every kernel from here on for sm_90 under ``triton_key`` (None: this Triton's own) and skip its
    launches; mimkernels runs its Triton path on CPU tensors as it does on a Hopper GPU's."""
    import torch
    import triton.runtime.cache as cache
    from triton.runtime.driver import driver

    from mimkernels import _backend
    from mimkernels.triton import attention, launch

    if triton_key is not None:
        cache.triton_key = lambda: triton_key  # get_cache_key looks it up in its module at every compile
    driver.set_active(PretendHopper())
    why_not, select = _backend._why_not, _backend.select
    _backend._why_not = lambda backend, device: (
        None if backend == "triton" and device.type == "cpu" else why_not(backend, device))

    def select_as_on_the_gpu(op, device, implemented):  # "auto" takes Triton (the extension is nvcc's, not here)
        if device.type == "cpu" and _backend.current_backend() == "auto" and "triton" in implemented:
            return "triton"
        return select(op, device, implemented)

    _backend.select = select_as_on_the_gpu
    launch.compute_capability = attention._arch = lambda device: 90
    launch.triton_interpreted = lambda: True  # tma_usable's test for CPU tensors: a Hopper's, alignment and strides
    torch.cuda.is_current_stream_capturing = lambda: False


# ----------------------------------------------------------------------------- the jobs: what the GPU session runs

def _tune_jobs(shape_names) -> list[tuple]:
    import torch

    from benchmarks import tune_attention

    shapes = {name: tune_attention.SHAPES[name] for name in shape_names}
    candidates = {name: tune_attention.shape_candidates(name, 90, torch.bfloat16) for name in shapes}
    return [("tune", job) for job in tune_attention.precompile_jobs(shapes, torch.bfloat16, candidates)]


def _bench_jobs(shape_names) -> list[tuple]:
    from benchmarks import bench_attention

    ours = ("mimkernels", "mimkernels_nondet", *bench_attention.SWITCHED_PROVIDERS, "mimkernels_causal")
    return [("bench", name, provider) for name in shape_names for provider in ours
            if provider != "mimkernels_causal" or bench_attention.SHAPES[name][4] == "prefix"]


def jobs_for(parts, tune_shapes, bench_shapes, model_shapes) -> list[tuple]:
    from benchmarks import sanitizer_cases

    jobs = []
    if "tune" in parts:
        jobs += _tune_jobs(tune_shapes)
    if "bench" in parts:
        jobs += _bench_jobs(bench_shapes)
    if "sanitizer" in parts:
        jobs += [("sanitizer", group) for group in sanitizer_cases.CASES]
    if "mim_ops" in parts:  # the mim_ops step: bench_tokens, bench_patch_embed (the loss too), our providers
        from benchmarks import bench_patch_embed, bench_tokens

        jobs += [("tokens", name) for name in bench_tokens.SHAPES]
        jobs += [("patch_embed", name) for name in bench_patch_embed.SHAPES]
    if "models" in parts:  # the models step: bench_norms, bench_mlp --sweep (every tile), then bench_models
        from benchmarks import bench_mlp, bench_norms
        from mimkernels.triton import mlp

        jobs += [("norm", name) for name in bench_norms.SHAPES]
        jobs += [("mlp", name, tile) for name in bench_mlp.SHAPES for tile in (None, *range(len(mlp.CANDIDATES)))]
        jobs += [("model", name, provider) for name in model_shapes for provider in MODEL_PROVIDERS]
    return jobs


def _rows_as_on_the_gpu(rows: int) -> int:
    """Fewer rows that Triton specialises the same way (a multiple of 16 stays one; rows are runtime ints)."""
    return min(rows, 256) if rows % 16 == 0 else rows


def _bench_job(name: str, provider: str) -> None:
    import torch

    from benchmarks import bench_attention

    batch, heads, seq_len, head_dim, mask = bench_attention.SHAPES[name]
    batch = min(batch, WARM_BATCH)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    prefix = torch.randint(1, seq_len, (batch,)) if mask == "prefix" else seq_len
    fn, _ = bench_attention.providers(q, k, v, prefix, with_flex=False)[provider]
    with bench_attention.switched(provider):
        torch.autograd.grad(fn(), (q, k, v), torch.randn(batch, heads, seq_len, head_dim, dtype=torch.bfloat16))


def _model_job(name: str, provider: str) -> None:
    """``provider``'s training-step forward and backward at bench_models' shape ``name``, with two blocks in each
    stack (every block is the same kernels; two cover what passes from one block to the next)."""
    import torch

    from benchmarks import bench_models
    from mimkernels import models

    family, config, batch = bench_models.SHAPES[name]
    torch.manual_seed(0)
    model = models.CONFIGS[family][config](**bench_models.model_kwargs(family, config))
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.ModuleList) and len(child) > 2:
                setattr(module, child_name, child[:2])
    imgs = torch.randn(min(batch, WARM_BATCH), 3, *model.patch_embed.img_size)
    loss_fn = bench_models.providers(family, model, imgs, "cpu")[provider]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn()
    loss.backward()


def _norm_job(name: str) -> None:
    """bench_norms' Triton provider, forward and backward, at its shape ``name``."""
    import torch

    from benchmarks import bench_norms

    rows, width = bench_norms.SHAPES[name]
    rows = _rows_as_on_the_gpu(rows)
    args = (torch.randn(rows, width, requires_grad=True),
            torch.randn(rows, width, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(width, requires_grad=True), torch.randn(width, requires_grad=True))
    grads = (torch.randn(rows, width), torch.randn(rows, width, dtype=torch.bfloat16))
    bench_norms._step(bench_norms.fused_triton, args, "fwd_bwd", grads, "cpu")()


def _tokens_job(name: str) -> None:
    """bench_tokens' providers of ours that run Triton (the fused backward's too), forward and backward, encoder and
    decoder, at its shape ``name``."""
    import torch

    from benchmarks import bench_tokens

    patches, dim = bench_tokens.SHAPES[name]
    for job in ("encoder", "decoder"):
        args, leaves, _, _ = bench_tokens.job_inputs(job, WARM_BATCH, patches, dim, torch.bfloat16, "cpu")
        for provider, fn in bench_tokens.providers(job).items():
            if provider.startswith("mimkernels"):
                grad_out = torch.randn_like(fn(*args))
                bench_tokens._step(fn, args, leaves, grad_out, "fwd_bwd", provider)()


def _patch_embed_job(name: str) -> None:
    """bench_patch_embed's providers of ours, forward and backward: patch embedding in each mode and the masked loss
    (with the grouped-patch A/B), at its shape ``name`` on 224-pixel images."""
    import torch

    from benchmarks import bench_patch_embed as bench

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(WARM_BATCH, 3, 224, 224, generator=gen).to(torch.bfloat16)
    inputs = bench.shape_inputs(name, images, gen)
    for embed_mode in bench.EMBED_MODES:
        extra, grads_of = bench.embed_mode_args(inputs, embed_mode)
        for provider, fn in bench._embedders(images, *inputs.leaves[:3], extra):
            if provider.startswith("mimkernels"):
                bench._step(fn, grads_of, "fwd_bwd")()
    for provider, fn, group in bench._losses(images, inputs.pred, inputs.loss_mask, inputs.patch):
        if provider.startswith("mimkernels"):
            bench._with_patches_per_program(bench._step(fn, [inputs.pred], "fwd_bwd"), group)()


def _mlp_job(name: str, tile: int | None) -> None:
    """bench_mlp's Triton provider (``tile`` None: the shipped tile; else that CANDIDATES entry, as --sweep runs it),
    forward and backward under bf16 autocast, at its shape ``name``."""
    import torch

    from benchmarks import bench_mlp
    from mimkernels.triton import mlp

    rows, width, hidden, bias = bench_mlp.SHAPES[name]
    rows = _rows_as_on_the_gpu(rows)
    args = (torch.randn(rows, width, requires_grad=True), torch.randn(hidden, width, requires_grad=True),
            torch.randn(hidden, requires_grad=True) if bias else None, torch.randn(width, hidden, requires_grad=True),
            torch.randn(width, requires_grad=True) if bias else None)
    bench_mlp._step(bench_mlp.fused_triton, args, "fwd_bwd", torch.randn(rows, width, dtype=torch.bfloat16), "cpu",
                    torch.bfloat16, None if tile is None else mlp.CANDIDATES[tile])()


def run_job(job: tuple) -> str:
    """One job in a worker that :func:`pretend_hopper` set up; returns its label."""
    kind, *args = job
    if kind == "tune":
        from benchmarks import tune_attention

        tune_attention._precompile_one(args[0], device="cpu")
    elif kind == "bench":
        _bench_job(*args)
    elif kind == "sanitizer":
        from benchmarks import sanitizer_cases

        for _ in sanitizer_cases.CASES[args[0]]("cpu"):  # each case runs as the generator reaches it
            pass
    elif kind == "model":
        _model_job(*args)
    elif kind == "norm":
        _norm_job(*args)
    elif kind == "mlp":
        _mlp_job(*args)
    elif kind == "tokens":
        _tokens_job(*args)
    elif kind == "patch_embed":
        _patch_embed_job(*args)
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    return " ".join(str(arg) for arg in (kind, *args))


def _quietly(job: tuple) -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        return run_job(job)


# ----------------------------------------------------------------------------- the archive

def _entries(cache_dir: str) -> list[str]:
    """The cache's entries (one folder per compiled kernel) that hold a finished kernel (its group file)."""
    if not os.path.isdir(cache_dir):
        return []
    folders = (os.path.join(cache_dir, name) for name in os.listdir(cache_dir))
    return sorted(os.path.basename(folder) for folder in folders
                  if os.path.isdir(folder) and any(file.startswith("__grp__") for file in os.listdir(folder)))


def _carried(cache_dir: str) -> dict:
    """What :func:`unpack` put into ``cache_dir``: {"archives": their sha256s, "entries": the entries they added}."""
    path = os.path.join(cache_dir, CARRIED)
    if not os.path.exists(path):
        return {"archives": [], "entries": []}
    with open(path) as f:
        return json.load(f)


def _file_sha(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _made() -> dict:
    """A manifest's provenance: the commit (MIMKERNELS_COMMIT where set, as for every result) and the UTC time."""
    from benchmarks import common

    return {"commit": common.commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def pack(cache_dir: str, out: str, manifest: dict, entries: list[str] | None = None) -> int:
    """Write ``cache_dir``'s finished entries (or those named) and ``manifest`` to the tar.xz ``out``; returns the
    entry count."""
    entries = _entries(cache_dir) if entries is None else entries
    manifest = {**manifest, "entries": len(entries)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = out + ".partial"  # renamed when whole: a cut-off pack leaves the archive before it, not half of one
    with tarfile.open(partial, "w:xz") as archive:
        for entry in entries:
            for name in sorted(os.listdir(os.path.join(cache_dir, entry))):
                if name.endswith(KEPT):
                    archive.add(os.path.join(cache_dir, entry, name), arcname=f"{entry}/{name}")
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    os.replace(partial, out)
    return len(entries)


def unpack(archive_path: str, cache_dir: str | None = None) -> str:
    """Put the archive's kernels into Triton's cache (``cache_dir``, default Triton's own), each group file pointing
    at its files there; an entry already present is kept. Returns one line: how many, and whether the archive was
    made for this Triton (its key parts against this machine's)."""
    import triton

    cache_dir = cache_dir or triton.knobs.cache.dir
    os.makedirs(cache_dir, exist_ok=True)
    carried, archive_sha = _carried(cache_dir), _file_sha(archive_path)
    if archive_sha in carried["archives"]:  # each gpu_*.sh step sources gpu_env.sh, which unpacks
        return f"carried Triton cache {os.path.basename(archive_path)}: unpacked into {cache_dir} before"
    added = []
    with tarfile.open(archive_path, "r:xz") as archive:
        manifest = json.load(archive.extractfile(MANIFEST))
        files = {}  # entry -> {file name: member}
        for member in archive.getmembers():
            if not member.isfile() or member.name == MANIFEST:
                continue
            entry, _, file_name = member.name.partition("/")
            if "/" in file_name or entry in ("", "..") or file_name in ("", ".."):
                raise ValueError(f"{archive_path}: unexpected path {member.name!r} (entry/file only)")
            files.setdefault(entry, {})[file_name] = member
        present = set(os.listdir(cache_dir))
        for entry, members in files.items():
            groups = [name for name in members if name.startswith("__grp__")]
            if entry in present or len(groups) != 1:
                continue
            group = json.load(archive.extractfile(members[groups[0]]))
            # what the archive holds of the group (not the source text, say): a binary and its metadata at least
            children = {child: os.path.basename(path) for child, path in group["child_paths"].items()
                        if os.path.basename(path) in members}
            if not {".cubin", ".json"} <= {os.path.splitext(name)[1] for name in children.values()}:
                continue  # a kernel that cannot load is left out: Triton compiles it as if none were carried
            os.makedirs(os.path.join(cache_dir, entry))
            for name in children.values():
                with open(os.path.join(cache_dir, entry, name), "wb") as f:
                    f.write(archive.extractfile(members[name]).read())
            # last, so that a cut-off unpack leaves no entry Triton would take as whole; with absolute paths, as
            # Triton writes them, into this cache
            group["child_paths"] = {child: os.path.join(cache_dir, entry, name) for child, name in children.items()}
            with open(os.path.join(cache_dir, entry, groups[0]), "w") as f:
                json.dump(group, f)
            added.append(entry)
    carried["archives"].append(archive_sha)
    carried["entries"] = sorted(set(carried["entries"]) | set(added))
    with open(os.path.join(cache_dir, CARRIED), "w") as f:
        json.dump(carried, f)
    here = key_parts()
    differ = [f"{name} (archive {manifest.get(name)!r}, here {value!r})" for name, value in here.items()
              if manifest.get(name) != value]
    verdict = ("made for this Triton: yes" if not differ else
               "made for this Triton: NO, every kernel compiles here as before; differs: " + "; ".join(differ))
    return (f"carried Triton cache {os.path.basename(archive_path)}: {len(added)} of {manifest['entries']} kernels "
            f"added to {cache_dir} (commit {manifest.get('commit', '?')[:7]}, {manifest.get('parts')}); {verdict}")


def _kernel_name(cache_dir: str, entry: str) -> str:
    """The kernel an entry holds (its metadata's name), e.g. ``_prefix_causal_fwd``."""
    folder = os.path.join(cache_dir, entry)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and not name.startswith("__grp__"):
            with open(os.path.join(folder, name)) as f:
                return json.load(f).get("name", name[:-5])
    return "?"


def report(cache_dir: str | None = None, pack_to: str | None = None) -> str:
    """How many kernels this machine's cache holds that it compiled itself (by kernel name: what a carried archive
    lacked), against those unpacked into it. ``pack_to``: those it compiled, packed there (a GPU session returns them:
    the next session carries them too, and they show which specialisations ``warm`` did not reach); not kept past
    15.5 MiB (the device tool returns files up to 16)."""
    import collections

    import triton

    cache_dir = cache_dir or triton.knobs.cache.dir
    carried = set(_carried(cache_dir)["entries"])
    compiled = [entry for entry in _entries(cache_dir) if entry not in carried]
    names = collections.Counter(_kernel_name(cache_dir, entry) for entry in compiled)
    line = (f"Triton cache {cache_dir}: {len(compiled)} kernels compiled on this machine, {len(carried)} carried "
            f"in (a carried kernel that matched was loaded, not compiled)"
            + (": " + ", ".join(f"{name} {count}" for name, count in names.most_common()) if names else ""))
    if pack_to and compiled:
        manifest = {**key_parts(), "target": "this machine's GPU", "parts": ["compiled on a GPU"], **_made()}
        pack(cache_dir, pack_to, manifest, compiled)
        size = os.path.getsize(pack_to) / 2**20
        if size > 15.5:
            os.remove(pack_to)
            line += f"; not packed ({size:.1f} MiB: over what the device tool returns)"
        else:
            line += f"; packed into {pack_to} ({size:.1f} MiB)"
    return line


# ----------------------------------------------------------------------------- warm

def warm_gpu_tests(select: list[str], workers: int, triton_key: str | None) -> tuple[int, str]:
    """The ``gpu`` tests named by ``select`` (pytest's arguments: files, node ids, -k) run through
    benchmarks/pretend_gpu_tests.py in ``workers`` processes, their kernels compiled into TRITON_CACHE_DIR under
    ``triton_key``; their checks are switched off (python -O, assert_close a no-op) so that each test reaches every
    kernel it launches. Returns pytest's exit code (1, some tests failed, is expected: their verdicts mean nothing
    here) and its summary line."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env |= {"PYTHONOPTIMIZE": "1", "MIMKERNELS_WARM_TRITON_KEY": triton_key or "",
            "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--assert=plain",
               "-p", "benchmarks.pretend_gpu_tests", "-n", str(workers), *select]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = run.stdout.strip().splitlines() or [run.stderr.strip()[-300:]]
    return run.returncode, lines[-1].strip("= ")


def warm(out: str, jobs: list[tuple], workers: int, wheel: str | None, parts,
         tests_select: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton_cache warm compiles real kernels: unset TRITON_INTERPRET")
    import triton

    triton_key = triton_key_of_wheel(wheel) if wheel else None
    cache_dir = tempfile.mkdtemp(prefix="mimkernels-triton-cache-")
    # read by Triton in the workers (spawned: they inherit this environment); binaries only, not every IR
    os.environ.update(TRITON_CACHE_DIR=cache_dir, TRITON_STORE_BINARY_ONLY="1")
    start, failed = time.monotonic(), []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=pretend_hopper,
                                                initargs=(triton_key,)) as pool:
        futures = {pool.submit(_quietly, job): job for job in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            if future.exception() is not None:
                failed.append(f"{futures[future]}: {type(future.exception()).__name__}: {future.exception()}")
            if done % 50 == 0 or done == len(jobs):
                print(f"warm: {done} of {len(jobs)} jobs, {len(_entries(cache_dir))} kernels, "
                      f"{time.monotonic() - start:.0f} s", flush=True)
    tests_line, tests_failed = None, False
    if "tests" in parts:
        tests_start = time.monotonic()
        code, summary = warm_gpu_tests(tests_select or ["tests"], workers, triton_key)
        tests_failed = code not in (0, 1)  # 2 and up: pytest could not run them (interrupted, usage, collection)
        tests_line = (f"{summary} (pytest exit {code}; checks off, verdicts not meant), "
                      f"{time.monotonic() - tests_start:.0f} s")
        print(f"warm: gpu tests: {tests_line}; {len(_entries(cache_dir))} kernels", flush=True)
    pretend_hopper(triton_key)  # this process's key parts are the workers'
    manifest = {**key_parts(), "target": "cuda sm_90", "parts": list(parts), "jobs": len(jobs),
                "failed_jobs": len(failed), **({"gpu_tests": tests_line} if tests_line else {}), **_made(),
                "python_of_key": "the wheel's: " + os.path.basename(wheel) if wheel else sys.version.split()[0]}
    count = pack(cache_dir, out, manifest)
    shutil.rmtree(cache_dir, ignore_errors=True)
    for line in failed:
        print("failed:", line[:300])
    print(f"warm: {count} kernels for sm_90 (Triton {triton.__version__}) in {out}, "
          f"{os.path.getsize(out) / 2**20:.1f} MiB, {time.monotonic() - start:.0f} s; {len(failed)} jobs failed")
    return 1 if tests_failed or (failed and len(failed) == len(jobs)) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_cache", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    w = verbs.add_parser("warm", help="compile the next GPU session's kernels here, into an archive")
    w.add_argument("--out", required=True)
    w.add_argument("--wheel", help="the GPU machine's Triton wheel (its libtriton is part of every key)")
    w.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    w.add_argument("--tune-shapes", nargs="+", default=None, help="default: all of tune_attention's")
    w.add_argument("--bench-shapes", nargs="+", default=None, help="default: all of bench_attention's")
    w.add_argument("--model-shapes", nargs="+", default=list(MODEL_SHAPES))
    w.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    w.add_argument("--limit", type=int, help="the first LIMIT jobs only (a quick check)")
    w.add_argument("--tests", nargs="+", default=["tests"], metavar="PYTEST_ARG",
                   help="with --parts tests: which gpu tests (pytest's arguments; default: the whole tests folder)")
    u = verbs.add_parser("unpack", help="put an archive's kernels into this machine's Triton cache")
    u.add_argument("archive")
    u.add_argument("--cache-dir")
    r = verbs.add_parser("report", help="kernels compiled on this machine against those carried in")
    r.add_argument("--cache-dir")
    r.add_argument("--pack", help="pack the kernels compiled on this machine into this tar.xz")
    args = parser.parse_args(argv)
    if args.verb == "unpack":
        print(unpack(args.archive, args.cache_dir))
        return 0
    if args.verb == "report":
        print(report(args.cache_dir, args.pack))
        return 0
    from benchmarks import bench_attention, tune_attention

    jobs = jobs_for(args.parts, args.tune_shapes or tune_attention.TUNED, args.bench_shapes or
                    list(bench_attention.SHAPES), args.model_shapes)[:args.limit]
    return warm(args.out, jobs, args.workers, args.wheel, args.parts, args.tests)


if __name__ == "__main__":
    sys.exit(main())

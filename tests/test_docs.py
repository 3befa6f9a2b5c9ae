"""Every public function, class and method of the package has a docstring (the brief: docs for every public
function). Public: listed in a module's ``__all__``; for classes, their own methods not starting with ``_``."""
import inspect
import subprocess
import sys

import pytest

import mimkernels
import mimkernels.integrations
import mimkernels.models
import mimkernels.nn
import mimkernels.parallel

PUBLIC_MODULES = [mimkernels, mimkernels.nn, mimkernels.parallel, mimkernels.integrations, mimkernels.models]
# nn.Module.forward is documented by its class (timm / torch convention); the rest needs its own
UNDOCUMENTED_BY_CONVENTION = {"forward", "extra_repr"}


def _public_objects():
    for module in PUBLIC_MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if not callable(obj):
                continue
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") or attr in UNDOCUMENTED_BY_CONVENTION:
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if inspect.isfunction(member) or isinstance(member, property):
                        yield f"{module.__name__}.{name}.{attr}", member


def test_public_api_is_listed():
    assert {"attention", "prefix_causal_attention", "random_masking", "restore_tokens", "patch_embed",
            "masked_patch_loss"} <= set(mimkernels.__all__)
    assert len(list(_public_objects())) > 40  # the walk itself finds the API (it would pass vacuously if empty)


def test_submodules_load_on_first_use():
    """``import mimkernels`` then ``mimkernels.models...`` works without importing the submodule first (it was an
    AttributeError); a fresh interpreter, since this one has imported them all."""
    code = ("import sys, mimkernels\n"
            "assert 'mimkernels.models' not in sys.modules and 'mimkernels.integrations' not in sys.modules\n"
            "assert all(getattr(mimkernels, name).__name__ == 'mimkernels.' + name for name in mimkernels.SUBMODULES)\n"
            "try:\n    mimkernels.no_such_thing\nexcept AttributeError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "module 'mimkernels' has no attribute 'no_such_thing'" in result.stdout


@pytest.mark.parametrize("name,obj", list(_public_objects()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_object_has_a_docstring(name, obj):
    assert (inspect.getdoc(obj) or "").strip(), f"{name} has no docstring"

"""Test set-up: on a machine without CUDA, run the Triton kernels in Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection
time, before any test module imports ptkernels' kernels. On a GPU machine the kernels are compiled.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh inductor / AOTAutograd cache per test session: torch's cache key covers the forward graph
# but not the Python backward registered for a custom op, so a cache left by an older checkout on the
# same machine can replay an outdated backward call (seen when a backward argument was added).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ptkernels-inductor-"))

# Under pytest-xdist (the README's `-n auto`) on the CPU, one torch thread per worker: with one
# worker per core, several OpenMP threads each oversubscribe the cores, and their spin-waits made
# the Hugging Face tests 1.6x slower than in one process.
if not torch.cuda.is_available() and os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import pytest  # noqa: E402


def _speed_up_triton_interpreter() -> None:
    """Two costs of Triton's interpreter that are pure overhead, cut for the test run only.

    - Every call of a ``@triton.jit`` helper from inside a kernel (``common.*``: tens of thousands a
      test module) patches ``triton.language`` for the interpreter anew (``_patch_lang``: an
      ``inspect.getmembers`` over four modules, 2 ms a call), though the kernel launch around it
      has already patched the same modules: the nested patch changes nothing, and its scope is
      dropped, never restored. Here a nested call skips it when the running launch, or an earlier
      nested call, has patched every module the helper's globals name (triton's own helpers such as
      ``tl.max`` also name ``triton.language.core``, which the first such call patches as before).
    - ``_get_np_dtype`` builds its dict of 20 dtypes on every call (70 000 calls in one TMA test);
      here it is cached per dtype (per element dtype for a block).

    The README's test command went from 1,099 s to 842 s on a 2-core VM (2026-12-02, triton 3.9.0),
    the tests other than the two AOT compiles by about 30%. Nothing here changes what a kernel computes:
    a builtin left unpatched raises (it needs the interpreter's semantic) rather than compute
    something else. If triton's interpreter no longer has these names, nothing is changed;
    PTKERNELS_PLAIN_INTERPRETER=1 leaves it unchanged too (to rule this out when a test fails).
    """
    import inspect

    try:
        import triton.language as tl
        from triton.runtime import interpreter
        patch_lang, scope_type = interpreter._patch_lang, interpreter._LangPatchScope
        launch, get_np_dtype = interpreter.GridExecutor.__call__, interpreter._get_np_dtype
    except (ImportError, AttributeError):
        return

    modules_seen = {}

    def lang_modules(fn) -> frozenset:  # what _patch_lang patches for fn: the triton.language it sees
        if fn not in modules_seen:
            modules_seen[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                         if inspect.ismodule(v) and v in (tl, tl.core))
        return modules_seen[fn]

    patched = []  # [modules patched since the running launch began], or [] outside a launch

    def patch_lang_once(fn):
        modules = lang_modules(fn)
        if patched and modules and modules <= patched[-1]:
            return scope_type()  # a nested call: these modules are patched, by the launch or an earlier call
        scope = patch_lang(fn)
        if patched:
            # The launch's own patch (restored when it ends) or a nested one (never restored)
            patched[-1] |= modules
        return scope

    def launch_tracking_patches(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    np_dtypes = {}

    def get_np_dtype_cached(tt_dtype):
        # a block's numpy dtype is its element's (block types are unhashable: keyed by the element)
        key = (type(tt_dtype), tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype)
        try:
            return np_dtypes[key]
        except KeyError:
            np_dtypes[key] = get_np_dtype(tt_dtype)
            return np_dtypes[key]
        except TypeError:  # an unhashable scalar type (pointers): uncached
            return get_np_dtype(tt_dtype)

    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch_tracking_patches
    interpreter._get_np_dtype = get_np_dtype_cached


if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PTKERNELS_PLAIN_INTERPRETER") != "1":
    _speed_up_triton_interpreter()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)

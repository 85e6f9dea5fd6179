"""No import cycles: every module under flyer/ imports on its own, and no function-local import of
a flyer module hides a cycle (a local import says why on its line, e.g. an optional dependency)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import flyer

ROOT = Path(flyer.__file__).parent
MODULES = sorted(".".join(("flyer", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
                 for p in ROOT.rglob("*.py"))

# One interpreter; before each module every flyer.* module is forgotten, so each import starts
# from that module alone (as a cycle would first bite) while torch stays loaded and it stays fast.
# Each source's code object is compiled once and kept (keyed on its bytes): where the environment says
# PYTHONDONTWRITEBYTECODE nothing else caches it, and compiling flyer again for every module took 25 of 35 s.
_SCRIPT = """
import importlib, importlib.machinery, json, sys, traceback
compiled, compile_source = {}, importlib.machinery.SourceFileLoader.source_to_code
def source_to_code(self, data, path, **kw):
    if (path, data) not in compiled:
        compiled[path, data] = compile_source(self, data, path, **kw)
    return compiled[path, data]
importlib.machinery.SourceFileLoader.source_to_code = source_to_code
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "flyer" or m.startswith("flyer.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException as e:
        failed[name] = traceback.format_exception_only(type(e), e)[-1].strip()
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    assert "flyer.cli" in MODULES and "flyer.cluster" in MODULES and len(MODULES) > 40
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(MODULES)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {}


def _local_flyer_imports(path: Path):
    lines = path.read_text().splitlines()
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] if not node.level else ["flyer"]
                else:
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if any(n == "flyer" or n.startswith("flyer.") for n in names):
                    if "#" not in lines[node.lineno - 1]:
                        yield f"{path.relative_to(ROOT.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}"


def test_no_unexplained_function_local_flyer_imports():
    """A flyer import inside a function says on its line why it is not at the top (an optional,
    heavy dependency); one that only dodges a cycle means the seam is in the wrong place."""
    found = [hit for p in sorted(ROOT.rglob("*.py")) for hit in _local_flyer_imports(p)]
    assert not found, "import at the top (a cycle means the seam is in the wrong place):\n" + "\n".join(found)


def test_flyer_train_starts_without_the_pipelining_and_sharded_optimizer_packages():
    """``torch.distributed.pipelining`` and ``torch.distributed.optim`` (dynamo, DTensor, FSDP) took about 3 of
    the 5.6 s that importing the trainer took, which every ``flyer train`` process, pipelined or not, paid:
    they are imported when a pipeline or a sharded optimizer is built. Nor does any command load dynamo at start
    (llguidance's torch helpers ``torch.compile`` a kernel at import: 4 s more for every ``flyer`` process)."""
    script = ("import sys, flyer.cli, flyer.train.trainer; print([m for m in ('torch.distributed.pipelining', "
              "'torch.distributed.optim', 'torch._dynamo') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]"], out.stdout

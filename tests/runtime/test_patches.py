"""Every megatron/torch patch: listed with the releases it applies to, applied only in runtime/, refused elsewhere.

The table below is the list (docs/architecture.md, "megatron-core versions"). It is checked exactly against what a
real run patches - the CPU adapter, a distributed-optimizer save and resume, a model build - under the installed
megatron-core, so running this file under both ends of the range (Python 3.11 + 0.16.1, 3.12 + 0.19.x) proves each
range true at both ends: a patch outside its range raises, and one inside it that is not applied fails the table.
"""
import ast
import importlib.util
from pathlib import Path

import pytest

from tests.harness.progression_data import progression_datasets
from tinyllm_mcore.runtime import compat, cpu
from tinyllm_mcore.runtime import distributed as rt
from tinyllm_mcore.training.batches import lm_forward_step
from tinyllm_mcore.training.loop import Stage, parse_args, train

REPO = Path(__file__).resolve().parents[2]

MEGATRON_CORE = "megatron-core>=0.16.1,<0.20"
TORCH = "torch>=2.4"
CPU = (MEGATRON_CORE, TORCH)
# When a patch is applied at all: on a machine without CUDA (the CPU adapter), without Transformer Engine, always.
ON_CPU, WITHOUT_TE, ALWAYS = "on CPU", "without Transformer Engine", "always"

CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules", "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer", "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils", "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.rerun_state_machine", "megatron.core.tensor_parallel.data", "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils", "megatron.core.utils",
)

# patched attribute -> (the releases it applies to, when it is applied). "Class()." marks a patch of single objects.
EXPECTED = {
    # runtime/cpu.py
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker": (CPU, ON_CPU),
    "megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER": (CPU, ON_CPU),
    "megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER_INITIALIZED": (CPU, ON_CPU),
    "megatron.core.tensor_parallel.random._get_cuda_rng_state": (CPU, ON_CPU),
    "megatron.core.tensor_parallel.random._set_cuda_rng_state": (CPU, ON_CPU),
    "torch.cuda.current_device": (CPU, ON_CPU),
    "torch.cuda.synchronize": (CPU, ON_CPU),
    "torch.cuda.manual_seed": (CPU, ON_CPU),
    "torch.cuda.current_stream": (CPU, ON_CPU),
    "torch.Tensor.cuda": (CPU, ON_CPU),
    "torch.Tensor.type": (CPU, ON_CPU),  # scoped: inside the optimizers' constructors and clip-grad only
    **{f"{module}.torch": (CPU, ON_CPU) for module in CUDA_FACTORY_MODULES},
    "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__": (CPU, ON_CPU),
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups": (CPU, ON_CPU),
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32": (CPU, ON_CPU),
    "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32": (CPU, ON_CPU),
    # runtime/compat.py
    "megatron.core.optimizer.optimizer.MegatronOptimizer._filter_and_reorder_param_groups":
        (("megatron-core>=0.19,<0.20",), ALWAYS),
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer()._set_main_param_and_optimizer_states":
        ((MEGATRON_CORE,), ALWAYS),  # scoped: during a load
    "megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue": ((MEGATRON_CORE,), ALWAYS),
    "megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync"
    ".write_preloaded_data_multiproc": (("megatron-core>=0.16.1,<0.19",), ALWAYS),
    "megatron.core.transformer.moe.moe_utils.te_general_gemm": (("megatron-core>=0.16.1,<0.19",), WITHOUT_TE),
}
SCOPED = {"torch.Tensor.type",
          "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer()._set_main_param_and_optimizer_states"}


def _applies_here(when: str) -> bool:
    return {ON_CPU: cpu.is_active(), WITHOUT_TE: importlib.util.find_spec("transformer_engine") is None,
            ALWAYS: True}[when]


def _megatron_patches() -> dict:
    """The registry without this file's own test patches."""
    return {target: p for target, p in compat.applied_patches().items() if not target.startswith(__name__)}


def test_every_patch_is_listed_with_its_release_range(tmp_path):
    """A distributed-optimizer run saved and resumed in this process applies every patch this machine needs."""
    stage = Stage("pretrain", progression_datasets, lm_forward_step)
    common = ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--lr-warmup-iters", "0",
              "--mock-data", "--use-distributed-optimizer", "--save", str(tmp_path / "ckpt")]
    for argv in (["--train-iters", "1"], ["--train-iters", "2", "--load", str(tmp_path / "ckpt")]):
        try:
            train(stage, parse_args(stage, common + argv))
        finally:
            rt.destroy()

    expected = {target: versions for target, (versions, when) in EXPECTED.items()
                if _applies_here(when) and compat.outside_range(versions) is None}
    applied = _megatron_patches()
    assert {target: p.versions for target, p in applied.items()} == expected
    assert {target for target, p in applied.items() if p.scoped} == SCOPED & expected.keys()
    assert all(p.why for p in applied.values())


def test_the_declared_ranges_are_setup_pys():
    setup = (REPO / "setup.py").read_text()
    assert compat.MEGATRON_CORE == MEGATRON_CORE and f'"{MEGATRON_CORE}"' in setup
    assert compat.TORCH == TORCH and f'"{TORCH}"' in setup


# --- the mechanism -----------------------------------------------------------------------------------------------

def test_a_patch_is_recorded_once_and_applied_once():
    class Owner:
        def method(self):
            return "original"

    def twice(original):
        return lambda self: original(self) * 2

    for _ in range(3):
        compat.wrap(Owner, "method", twice, versions=compat.MEGATRON_CORE, why="test")
    assert Owner().method() == "originaloriginal"  # wrapped once, however often asked
    patch = compat.applied_patches()[f"{__name__}.{Owner.__qualname__}.method"]
    assert patch.versions == (compat.MEGATRON_CORE,) and not patch.scoped
    with pytest.raises(ValueError, match="two different declarations"):
        compat.wrap(Owner, "method", twice, versions=compat.MEGATRON_CORE, why="another reason")


def test_a_scoped_patch_restores_what_the_object_had():
    class Owner:
        def method(self):
            return "class"

    one = Owner()
    with compat.patched(one, "method", lambda: "patched", versions=compat.MEGATRON_CORE, why="test"):
        assert one.method() == "patched" and Owner().method() == "class"
    assert one.method() == "class" and "method" not in vars(one)
    assert compat.applied_patches()[f"{__name__}.{Owner.__qualname__}().method"].scoped


@pytest.mark.parametrize("package, fake", [("megatron-core", "0.20.0"), ("megatron-core", "0.16.0"),
                                           ("megatron-core", "0.20.0rc1"), ("torch", "2.3.1")])
def test_a_patch_is_refused_on_a_release_outside_its_range(monkeypatch, package, fake):
    """Nothing changes and nothing is recorded: a release the patch was not checked against gets no patch."""
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version", lambda name: fake if name == package else real(name))

    class Owner:
        value = "original"

    for declare in (lambda: compat.patch(Owner, "value", "patched", versions=CPU, why="test"),
                    lambda: compat.patched(Owner, "value", "patched", versions=CPU, why="test").__enter__()):
        with pytest.raises(compat.PatchVersionError, match=rf"{package} {fake} is not"):
            declare()
    assert Owner.value == "original" and not any(t.startswith(f"{__name__}.{Owner.__qualname__}")
                                                 for t in compat.applied_patches())
    if package == "megatron-core":  # a real patch too, before megatron's module is touched
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        before = filesystem_async._results_queue
        with pytest.raises(compat.PatchVersionError, match=r"filesystem_async\._results_queue"):
            compat.write_checkpoints_in_process()
        assert filesystem_async._results_queue is before


def test_a_range_holds_pre_releases_and_local_builds(monkeypatch):
    versions = {"megatron-core": "0.19.0rc1", "torch": "2.13.0+cpu"}
    monkeypatch.setattr(compat, "installed_version", versions.__getitem__)
    assert compat.outside_range(CPU) is None
    assert compat.outside_range("megatron-core>=0.16.1,<0.19").startswith("megatron-core 0.19.0rc1 is not ")
    with pytest.raises(ValueError, match="name megatron-core"):
        compat.outside_range("torch>=2.4")


# --- nothing else patches ----------------------------------------------------------------------------------------

MECHANISM = {"patch", "wrap", "patched"}
_SCOPES = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _is_foreign_module(name: str) -> bool:
    return name.split(".")[0] in ("torch", "megatron")


def _scope_nodes(scope):
    """The nodes of one scope, not descending into nested functions or lambdas (their own scopes)."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, _SCOPES):
            todo.extend(ast.iter_child_nodes(node))


class _Scope:
    """Which names in one scope are megatron/torch modules, classes or functions, or our patch mechanism."""

    def __init__(self, node, parent: "_Scope | None"):
        self.node, self.parent = node, parent
        self.local, self.foreign, self.mechanism = set(), set(), set()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            self.local |= {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
        nodes = list(_scope_nodes(node))
        for n in nodes:
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                self.local.add(n.id)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.local.add(n.name)
            elif isinstance(n, ast.Import):
                for alias in n.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    self.local.add(bound)
                    if _is_foreign_module(alias.name):
                        self.foreign.add(bound)
                    elif alias.name == "tinyllm_mcore.runtime.compat" and alias.asname:
                        self.mechanism.add(bound)
            elif isinstance(n, ast.ImportFrom):
                for alias in n.names:
                    bound = alias.asname or alias.name
                    self.local.add(bound)
                    if n.level == 0 and _is_foreign_module(n.module or ""):
                        self.foreign.add(bound)
                    elif n.module == "tinyllm_mcore.runtime" and alias.name == "compat":
                        self.mechanism.add(bound)
                    elif n.module == "tinyllm_mcore.runtime.compat" and alias.name in MECHANISM:
                        self.mechanism.add(bound)
        # Aliases (`cls = megatron_optimizer.MegatronOptimizer`), to a fixed point.
        assigns = [n for n in nodes if isinstance(n, ast.Assign) and len(n.targets) == 1
                   and isinstance(n.targets[0], ast.Name)]
        while True:
            new = {n.targets[0].id for n in assigns if self.is_foreign(n.value)} - self.foreign
            if not new:
                break
            self.foreign |= new

    def lookup(self, name: str, kind: str) -> bool:
        scope = self
        while scope is not None:
            if name in getattr(scope, kind):
                return True
            if name in scope.local:
                return False
            scope = scope.parent
        return False

    def is_foreign(self, expr) -> bool:
        """A megatron/torch module, class or function (not what calling one returns: our tensors and objects)."""
        if isinstance(expr, ast.Name):
            return self.lookup(expr.id, "foreign")
        if isinstance(expr, ast.Attribute):
            return expr.attr == "__class__" or self.is_foreign(expr.value)
        if isinstance(expr, ast.Subscript):
            return self.is_foreign(expr.value) or ast.unparse(expr.value) == "sys.modules"
        if isinstance(expr, ast.Call):
            called = ast.unparse(expr.func)
            if called in ("type", "vars") or called.endswith("import_module") or called == "__import__":
                return True  # a class reached through its instance, a module's namespace, a module by name
            return called == "getattr" and bool(expr.args) and self.is_foreign(expr.args[0])
        return False

    def is_mechanism(self, func) -> bool:
        if isinstance(func, ast.Name):
            return self.lookup(func.id, "mechanism")
        return (isinstance(func, ast.Attribute) and func.attr in MECHANISM and isinstance(func.value, ast.Name)
                and self.lookup(func.value.id, "mechanism"))


def _is_private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def _own(expr) -> bool:
    return isinstance(expr, ast.Name) and expr.id in ("self", "cls")


def patch_sites(source: str, *, in_runtime: bool) -> list[str]:
    """Lines that patch megatron/torch: attributes of their modules, classes and functions assigned, deleted or
    setattr'd; private attributes of objects that are not our own (`self`); our mechanism called outside runtime/."""
    found = []

    def visit(node, parent):
        scope = _Scope(node, parent)
        for n in _scope_nodes(node):
            if isinstance(n, _SCOPES):
                visit(n, scope)
                continue
            targets = (n.targets if isinstance(n, (ast.Assign, ast.Delete)) else
                       [n.target] if isinstance(n, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in [e for t in targets for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])]:
                if isinstance(target, ast.Starred):
                    target = target.value
                if isinstance(target, ast.Attribute) and (
                        scope.is_foreign(target.value) or (_is_private(target.attr) and not _own(target.value))):
                    found.append(f"{n.lineno}: {ast.unparse(target)}")
                elif isinstance(target, ast.Subscript) and scope.is_foreign(target.value):
                    found.append(f"{n.lineno}: {ast.unparse(target)}")
            if isinstance(n, ast.Call) and n.args:
                called, owner = ast.unparse(n.func), n.args[0]
                if called in ("setattr", "delattr", "object.__setattr__", "object.__delattr__") and len(n.args) > 1:
                    name = n.args[1]
                    private = isinstance(name, ast.Constant) and _is_private(str(name.value))
                    if scope.is_foreign(owner) or (private and not _own(owner)):
                        found.append(f"{n.lineno}: {ast.unparse(n)}")
                elif not in_runtime and scope.is_mechanism(n.func):
                    found.append(f"{n.lineno}: {ast.unparse(n)} (the patch mechanism outside runtime/)")

    visit(ast.parse(source), None)
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def test_nothing_outside_the_mechanism_patches_megatron_or_torch():
    """tinyllm_mcore/ (runtime/ included: there, only through the mechanism), tools/ and checkpoint_convert/."""
    offenders = {}
    for folder in ("tinyllm_mcore", "tools", "checkpoint_convert"):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO)
            sites = patch_sites(path.read_text(encoding="utf-8"), in_runtime=relative.parts[:2] == (
                "tinyllm_mcore", "runtime"))
            if sites:
                offenders[str(relative)] = sites
    assert not offenders, f"megatron/torch patched outside runtime/compat.py's patch/wrap/patched: {offenders}"


FLAGGED = {
    "module attribute": "import torch\ntorch.cuda.current_device = lambda: 0",
    "imported module": "from megatron.core.transformer.moe import moe_utils as m\nm.te_general_gemm = None",
    "class attribute": "from megatron.core.optimizer import optimizer\noptimizer.MegatronOptimizer.f = staticmethod(g)",
    "an alias": "from megatron.core.optimizer import optimizer as o\ndef f():\n    cls = o.MegatronOptimizer\n"
                "    cls.g = 1",
    "by name": "import importlib\nimportlib.import_module('megatron.core.utils').torch = t",
    "setattr": "import torch\nsetattr(torch.Tensor, 'cuda', f)",
    "delete": "import torch\ndel torch.Tensor.cuda",
    "through an instance": "def f(t):\n    type(t).cuda = g",
    "a module's dict": "from megatron.core import parallel_state as ps\nps.__dict__['_X'] = 1",
    "one object's internals": "def load(opt):\n    opt._set_main_param_and_optimizer_states = copy",
    "one object's internals, setattr": "def load(opt):\n    setattr(opt, '_step', 1)",
    "the mechanism outside runtime/": "from tinyllm_mcore.runtime import compat\ncompat.patch(a, 'b', c, versions=v, "
                                      "why='')",
}
NOT_FLAGGED = {
    "our tensor": "import torch\np = torch.nn.Parameter(torch.ones(2))\np.grad = torch.zeros(2)\n"
                  "p.sequence_parallel = True",
    "our object": "class A:\n    def __init__(self):\n        self._x = 1\n        setattr(self, '_y', 2)",
    "a megatron config we built": "from megatron.core.transformer import TransformerConfig\n"
                                  "config = TransformerConfig(num_layers=1)\nconfig.grad_scale_func = f",
    "a spec we were handed": "from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec as g\n"
                             "spec = g()\nspec.submodules.input_layernorm = RMSNorm",
    "a shadowed name": "from megatron.core.optimizer import optimizer\ndef f(optimizer):\n    optimizer.x = 1",
    "a tensor's item": "import torch\nx = torch.zeros(3)\nx[0] = 1",
}


@pytest.mark.parametrize("case", FLAGGED)
def test_the_scan_finds_a_patch(case):
    assert patch_sites(FLAGGED[case], in_runtime=False)


@pytest.mark.parametrize("case", NOT_FLAGGED)
def test_the_scan_leaves_our_own_objects_alone(case):
    assert not patch_sites(NOT_FLAGGED[case], in_runtime=False)


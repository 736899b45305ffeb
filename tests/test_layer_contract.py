"""The layer contract of graph/api.py: serving reaches the engine only through `graph.api` types and
`Engine`'s public members (what it needs of the model too: vocabulary size, tokenizer, context
length, name), which `Replicas` (graph/replicas.py) has too, and `python -m graph.aot` compiles
without importing the threaded engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.server_fixtures import MAX_SEQ_LEN

pytest_plugins = ("tests.server_fixtures",)

ROOT = Path(__file__).resolve().parent.parent
# What serving may use of an engine.
ENGINE_SURFACE = {
    "submit", "abort", "stats", "broken", "shutdown",
    "vocab_size", "tokenizer", "max_seq_len", "model_name", "system_fingerprint",
}  # fmt: skip
# graph modules serving may import: the contract, the engine and its replicas (to build them), and the
# command lines (serving/config.py generates its options with graph.cli; `xlaserve compile` runs graph.aot).
GRAPH_IMPORTS = {"graph.api", "graph.engine", "graph.replicas", "graph.multihost", "graph.cli", "graph.aot"}
BUILDERS = {"graph.engine": ["Engine"], "graph.replicas": ["Replicas"]}  # what serving imports of those two


def _serving_trees() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text()) for p in sorted((ROOT / "serving").glob("*.py"))}


def _is_engine(node: ast.expr) -> bool:
    """`engine`, `self.engine`, `self._engine`, `state.engine`, ... (not `config.engine`, the
    engine's configuration)."""
    if isinstance(node, ast.Name):
        return node.id == "engine"
    if not (isinstance(node, ast.Attribute) and node.attr in ("engine", "_engine")):
        return False
    owner = node.value
    return (owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")) != "config"


def test_serving_imports_only_the_graph_contract():
    for name, tree in _serving_trees().items():
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
                if node.module in BUILDERS:
                    assert [a.name for a in node.names] == BUILDERS[node.module], name
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            for module in modules:
                assert not module.startswith("graph") or module in GRAPH_IMPORTS, f"{name} imports {module}"


def test_serving_uses_only_the_engines_public_members(aot_engine):
    used = set()
    for name, tree in _serving_trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_engine(node.value):
                assert node.attr in ENGINE_SURFACE, f"{name}:{node.lineno} reaches into the engine: .{node.attr}"
                used.add(node.attr)
    assert used >= {"submit", "tokenizer", "max_seq_len"}  # the walk sees the uses
    assert all(hasattr(aot_engine, attr) and not attr.startswith("_") for attr in ENGINE_SURFACE)
    from graph.replicas import Replicas

    assert all(hasattr(Replicas, attr) for attr in ENGINE_SURFACE)


def test_engine_tells_its_vocabulary_tokenizer_context_and_name(aot_engine, smol_model):
    assert aot_engine.vocab_size == smol_model.cfg.vocab_size == 49152  # SmolLM2's
    assert aot_engine.vocab_size >= aot_engine.tokenizer.vocab_size  # every id the tokenizer makes
    assert aot_engine.tokenizer is smol_model.tokenizer
    assert aot_engine.tokenizer.encode("Hello") == smol_model.tokenizer.encode("Hello")
    assert aot_engine.max_seq_len == MAX_SEQ_LEN
    assert aot_engine.model_name == smol_model.name == "smollm2-135m-instruct"


def test_graph_aot_does_not_import_the_threaded_engine():
    code = "import sys, graph.aot; print(sorted(m for m in sys.modules if m in ('graph.engine', 'graph.offline')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"

"""Sharded serving on a device mesh (graph/sharding.py), on the session's eight simulated CPU
devices (tests/conftest.py): tokens identical to one device on every mesh, the parameters and the
KV pool placed where the rules table says, meshes a model cannot have refused with the valid
values, artifacts bound to their mesh, and the rules table applied to real-size configs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from graph import sharding
from graph.api import ArtifactMismatchError, EngineConfig, SamplingParams
from graph.buckets import Buckets
from graph.executables import ExecutableTable
from graph.kv_cache import kv_bytes_per_page
from graph.layout import weight_options
from graph.offline import LLM
from models.config import ModelConfig
from models.loader import LoadedModel
from models.params import abstract_weights, compute_axes, init_params
from tests.test_engine import CompileCounter

# two decode buckets and one prefill bucket, no mixed steps: few executables to compile per mesh
CONFIG = EngineConfig(max_batch=2, max_seq_len=64, max_prefill_tokens=16, kv_pages=16, max_num_batched_tokens=0)
PROMPTS = [[5, 17, 99, 3, 42, 7], [11, 12, 14], list(range(1, 21)), [7]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
ARCHS = {
    # 8 KV heads: splits over a tensor axis of up to 8
    "llama": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=8, head_dim=8),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "gemma3": dict(
        model_type="gemma3_text",
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
}
# (data, tensor): 1x2, 2x1 and 1x4 for every architecture, and 2x4 for Llama (8 KV heads)
MESHES = {
    "llama": [(1, 2), (2, 1), (1, 4), (2, 4)],
    "qwen3": [(1, 2), (2, 1), (1, 4)],
    "gemma3": [(1, 2), (2, 1), (1, 4)],
}


def tiny(smol_model: LoadedModel, arch: str) -> LoadedModel:
    cfg = ModelConfig.from_hf({**TINY, **ARCHS[arch]})
    return dataclasses.replace(
        smol_model, name=arch, cfg=cfg, params=init_params(cfg, seed=3, scale=0.5), fingerprint=f"tiny-{arch}"
    )


def run(model: LoadedModel, data: int, tensor: int) -> tuple[list[list[int]], list[list[int]], LLM]:
    llm = LLM(model, dataclasses.replace(CONFIG, data_parallel=data, tensor_parallel=tensor))
    greedy = [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]
    seeded = [c.token_ids for c in llm.generate(PROMPTS, SEEDED)]
    return greedy, seeded, llm


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, smol_model) -> Iterator[tuple[str, LoadedModel, tuple]]:
    model = tiny(smol_model, request.param)
    greedy, seeded, llm = run(model, 1, 1)
    llm.shutdown()
    yield request.param, model, (greedy, seeded)


def test_session_has_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets --xla_force_host_platform_device_count=8"


@pytest.mark.slow
def test_every_mesh_gives_the_tokens_of_one_device(arch):
    name, model, reference = arch
    for data, tensor in MESHES[name]:
        greedy, seeded, llm = run(model, data, tensor)
        llm.shutdown()
        assert (greedy, seeded) == reference, f"{name} on {data} x {tensor}"


def test_parameters_and_the_kv_pool_sit_where_the_rules_say(smol_model):
    model = tiny(smol_model, "llama")
    llm = LLM(model, dataclasses.replace(CONFIG, data_parallel=2, tensor_parallel=4))
    try:
        w, kv = llm.engine.params, llm.engine.state.kv
        layer = w.layers[0]
        mesh = layer.qkv.sharding.mesh
        assert dict(mesh.shape) == {"data": 2, "model": 4}
        expected = {
            "embed": (w.embed, P("model", None)),  # vocab split
            "lm_head": (w.lm_head, P(None, "model")),
            "final_norm": (w.final_norm, P(None)),  # replicated
            "qkv": (layer.qkv, P(None, "model")),  # by head
            "o": (layer.o, P("model", None)),
            "gate_up": (layer.gate_up, P(None, "model")),  # the MLP's hidden dimension
            "down": (layer.down, P("model", None)),
            "attn_norm": (layer.attn_norm, P(None)),
            "kv.k": (kv.k, P(None, "model", None, None, None)),  # KV heads over model
            "kv.v": (kv.v, P(None, "model", None, None, None)),
        }
        for what, (array, spec) in expected.items():
            assert array.sharding == NamedSharding(mesh, spec), what
            # what each device really holds: its slice, not a copy of the whole
            shard = array.addressable_shards[0].data.shape
            parts = [1 if s is None else mesh.shape[s] for s in spec] + [1] * (array.ndim - len(spec))
            assert shard == tuple(n // k for n, k in zip(array.shape, parts, strict=True)), what
            assert len(array.addressable_shards) == 8
        # a device holds 1/4 of the KV heads of the pool, all of its pages
        assert kv.k.addressable_shards[0].data.shape == (2, 2, 16, 16, 8)
        assert llm.generate(PROMPTS[:1], GREEDY)[0].token_ids, "and it serves"
    finally:
        llm.shutdown()


def test_a_mesh_the_model_cannot_have_is_refused_with_what_would_work(smol_model):
    model = tiny(smol_model, "qwen3")  # 4 KV heads
    with pytest.raises(sharding.MeshError, match=r"--tensor-parallel 3 does not divide .* 4 KV heads.*1, 2, 4"):
        LLM(model, dataclasses.replace(CONFIG, tensor_parallel=3))
    with pytest.raises(sharding.MeshError, match=r"needs 16 devices; 8 available"):
        LLM(model, dataclasses.replace(CONFIG, tensor_parallel=4, data_parallel=4))


@pytest.mark.slow
def test_an_artifact_is_bound_to_its_mesh(smol_model, tmp_path):
    model = tiny(smol_model, "qwen3")
    on = dataclasses.replace(CONFIG, tensor_parallel=4, compile_cache="off")
    buckets = Buckets.from_config(on)
    table = ExecutableTable.compile(model.cfg, "float32", on, buckets, 16, serializable=True)
    table.save(tmp_path, model.fingerprint)
    other = dataclasses.replace(on, tensor_parallel=2)
    with pytest.raises(ArtifactMismatchError, match=r"mesh: artifact has .*'model': 4.* this server .*'model': 2"):
        ExecutableTable.load(tmp_path, model.cfg, "float32", other, buckets, model.fingerprint)
    compiles = CompileCounter()
    compiles.active = True
    llm = LLM(model, dataclasses.replace(on, aot_dir=str(tmp_path)))
    try:
        greedy = [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]
        assert compiles.count == 0, "a start from an artifact for this mesh, and serving, compile nothing"
        assert llm.engine.params.layers[0].qkv.sharding.spec == P(None, "model")
    finally:
        compiles.active = False
        llm.shutdown()
    reference, _, one = run(model, 1, 1)
    one.shutdown()
    assert greedy == reference


LLAMA_3_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
)  # fmt: skip
LLAMA_3_70B = {**LLAMA_3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80}
LLAMA_3_70B["num_attention_heads"] = 64


@pytest.mark.parametrize(
    ("name", "hf", "data", "tensor", "dtype"),
    [
        ("Llama-3-8B", LLAMA_3_8B, 1, 8, "bfloat16"),
        ("Llama-3-70B", LLAMA_3_70B, 1, 8, "bfloat16"),
        ("Llama-3-70B", LLAMA_3_70B, 2, 8, "bfloat16"),  # two hosts of 8
    ],
)
def test_real_size_configs_fit_their_mesh(name, hf, data, tensor, dtype):
    """Shapes only (`jax.eval_shape`, an abstract mesh): the rules table places every parameter,
    and one device's weights plus its part of an 8k-token KV pool fit an 80 GB device."""
    cfg = ModelConfig.from_hf(hf)
    sharding.check(cfg.num_kv_heads, cfg.num_heads, tensor, data, data * tensor)
    mesh = AbstractMesh((data, tensor), sharding.AXES)
    config = EngineConfig(tensor_parallel=tensor, data_parallel=data, dtype=dtype)
    weights = abstract_weights(cfg, jax.numpy.dtype(dtype), **weight_options(config))
    placed = sharding.tree_shardings(mesh, weights, compute_axes(weights))
    leaves = jax.tree.leaves(weights)
    total = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves)
    per_device = sharding.per_device_bytes(weights, placed)
    # every matrix is split 8 ways; only the norms are whole on each device
    assert per_device < total / tensor * 1.01
    pages = 8192 // 16 + 1
    pool = pages * kv_bytes_per_page(cfg, 16, dtype)
    pool_per_device = pool // tensor
    print(
        f"{name} {dtype} on {data} x {tensor}: weights {total / 2**30:.1f} GiB, {per_device / 2**30:.2f} GiB per "
        f"device; 8k-token KV pool {pool / 2**30:.2f} GiB, {pool_per_device / 2**30:.3f} GiB per device"
    )
    assert per_device + pool_per_device < 80e9


def test_smollm2_on_three_devices_gives_the_tokens_of_one(smol_llm, smol_model):
    """The bundled model's 3 KV heads over a tensor axis of 3 (the session's one-device engine is
    the reference; this one has fewer buckets, to compile in less time: outputs do not depend on
    the batch). 4 tokens, the prefills and 3 decode steps over the sharded KV pool: each step on 3
    simulated devices takes seconds on 2 cores (two collectives in each of 30 layers)."""
    from tests.server_fixtures import SMALL

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    reference = [c.token_ids for c in smol_llm.generate(prompts, params)]
    config = dataclasses.replace(SMALL, max_batch=4, max_num_batched_tokens=0, tensor_parallel=3)
    llm = LLM(smol_model, config)
    try:
        assert llm.engine.params.layers[0].qkv.sharding.spec == P(None, "model")
        assert [c.token_ids for c in llm.generate(prompts, params)] == reference
    finally:
        llm.shutdown()

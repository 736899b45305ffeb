"""The KV pool is updated in place by every executable kind: a copy of the pool (hundreds of MB
at default sizes) in a step is a silent 10-100x slowdown. Seen twice: a write after another
segment's read, and a one-token write (which XLA turns into a dynamic-update-slice) before the
attention loop."""

from __future__ import annotations

import re

import pytest

from graph.api import EngineConfig
from graph.programs import lowerings
from models.layers import kv_shape

CONFIG = EngineConfig(max_batch=8, max_seq_len=256, page_size=16, max_prefill_tokens=64)
NUM_PAGES = 37


@pytest.mark.parametrize("loop", ["layered", "scan"])
@pytest.mark.parametrize(
    "key", [("decode", 1, 1, 16), ("decode", 8, 1, 16), ("prefill", 1, 16, 4), ("mixed", 1, 16, 16)]
)
def test_no_executable_copies_the_kv_pool(tiny_model, loop, key):
    import dataclasses

    config = dataclasses.replace(CONFIG, layer_loop=loop)
    pool = kv_shape(tiny_model.cfg, NUM_PAGES, config.page_size)
    pattern = re.compile(rf"= f32\[{','.join(map(str, pool))}\]\{{[^}}]*\}} copy\(")
    compiled = 0
    for name, lower in lowerings(tiny_model.cfg, "float32", config, NUM_PAGES, key, config.max_seq_len).items():
        if name.startswith(("front", "head", "tail", "pick")):
            continue  # they never see the pool
        text = lower().compile().as_text()
        assert f"f32[{','.join(map(str, pool))}]" in text, name  # the pattern looks for the right shape
        assert not pattern.search(text), f"{name} copies the KV pool"
        compiled += 1
    assert compiled == 1

"""The README's code runs as written (reference backend on a CPU) and agrees with the dense oracle."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from tests import dense_oracle

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_decode_step_runs_and_matches_dense_attention():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    ns = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - our own README
    cfg, state, kv = ns["cfg"], ns["state"], ns["kv"]
    L, B, Hq, Hkv, D = cfg.num_layers, 8, 4, cfg.num_kv_heads, cfg.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    kv = jax.random.normal(keys[0], kv.shape, kv.dtype)  # stands in for the omitted prefill
    q, k, v = (jax.random.normal(kk, (L, B, h, D)) for kk, h in zip(keys[1:], (Hq, Hkv, Hkv)))
    state, kv, out, ok = ns["decode_step"](state, kv, q, k, v)
    assert bool(ok.all()) and out.shape == (L, B, Hq, D)
    table = np.asarray(state.page_table)
    lens = np.asarray(state.seq_lens)
    pages = [table[b, : -(-lens[b] // cfg.page_size)] for b in range(B)]
    for l in (0, L - 1):
        kc, _ = dense_oracle.contiguous_kv(kv, cfg.kv_layout, pages[0], lens[0], layer=l,
                                           num_pages=cfg.num_pages)
        np.testing.assert_allclose(kc[-1], np.asarray(k[l, 0]), rtol=1e-6)  # the new token, written
        want, _ = dense_oracle.batch_decode(q[l], kv, cfg.kv_layout, pages, lens, layer=l,
                                            num_pages=cfg.num_pages)
        np.testing.assert_allclose(np.asarray(out[l]), want, rtol=1e-4, atol=1e-5)

"""seqattn_jax: paged KV caches and paged attention for JAX.

`append_kv` here is the pure-JAX scatter (`seqattn_jax.kv`); `seqattn_jax.attention.append_kv` is the
same write with a `backend=` choice (FlashInfer's append kernel on a GPU).

The cache state and page allocator are pure, jit-compatible functions over pytrees (`state`), batches
are packed into FlashInfer's CSR page-table format (`packing`), K/V live in one page pool for all
layers (`kv`), and attention runs in FlashInfer's kernels on a GPU or in a pure-JAX reference
(`reference`) anywhere. Importing this package never imports torch or flashinfer.
"""

from seqattn_jax.attention import (
    AttentionPlan,
    HostPlan,
    adopt_plan,
    batch_decode,
    batch_pod,
    batch_prefill,
    host_plan_decode,
    plan_batch_pod,
    plan_decode,
    plan_pod,
    plan_prefill,
    pod,
)
from seqattn_jax import _checkout
from seqattn_jax.config import CacheConfig
from seqattn_jax.head_ids import HeadIDGenerator, head_ids, split_head_ids
from seqattn_jax.kv import append_kv, copy_pages, init_kv
from seqattn_jax.kv import scrub_pages
from seqattn_jax.packing import PackedBatch, pack_for_flashinfer
from seqattn_jax.prefix_cache import Admission, EvictResult, PrefixCache, PrefixCacheStats, freed_pages
from seqattn_jax.state import (
    CacheState,
    Status,
    allocate,
    allocate_decoding,
    fork,
    init_state,
    ref,
    release,
    share_prefix,
    state_from_page_table,
    truncate,
    unref,
)
from seqattn_jax.validation import AllocatorError, ok, raise_for_status

__version__ = "0.1.0"

__all__ = [
    "CacheConfig", "CacheState", "HeadIDGenerator", "PackedBatch", "Status", "allocate",
    "allocate_decoding", "append_kv", "copy_pages", "fork", "head_ids", "init_kv", "init_state",
    "pack_for_flashinfer", "ref", "release", "share_prefix", "split_head_ids", "state_from_page_table",
    "truncate", "unref",
]
__all__ += ["AttentionPlan", "HostPlan", "adopt_plan", "batch_decode", "batch_pod", "batch_prefill",
            "host_plan_decode", "plan_batch_pod", "plan_decode", "plan_pod", "plan_prefill", "pod"]
__all__ += ["AllocatorError", "ok", "raise_for_status"]
__all__ += ["Admission", "EvictResult", "PrefixCache", "PrefixCacheStats", "freed_pages", "scrub_pages"]

_checkout.install()  # a bare source checkout: `import seqattn_jax.bridge` finds ../bridge (see _checkout)

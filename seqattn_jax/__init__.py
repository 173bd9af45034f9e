"""seqattn_jax: paged KV caches and paged attention for JAX.

The cache state and page allocator are pure, jit-compatible functions over pytrees (`state`), batches
are packed into FlashInfer's CSR page-table format (`packing`), K/V live in one page pool for all
layers (`kv`), and attention (`attention`: plans, runs, `append_kv`) runs on a backend object
(`backend`: the contract): FlashInfer's kernels on a GPU (`seqattn_jax.bridge`, imported lazily) or
the pure-JAX reference (`reference`) anywhere. Importing this package never imports torch or
flashinfer.
"""

from seqattn_jax.attention import (
    adopt_plan,
    append_kv,
    batch_decode,
    batch_pod,
    batch_prefill,
    host_plan_batch_pod,
    host_plan_decode,
    host_plan_prefill,
    plan_batch_pod,
    plan_decode,
    plan_pod,
    plan_prefill,
    pod,
)
from seqattn_jax.backend import Backend, default_backend
from seqattn_jax.config import CacheConfig
from seqattn_jax.head_ids import HeadIDGenerator, head_ids, split_head_ids
from seqattn_jax.kv import copy_pages, init_kv, scrub_pages
from seqattn_jax.options import AttentionOptions
from seqattn_jax.packing import PackedBatch, pack_for_flashinfer
from seqattn_jax.plans import AttentionPlan, HostPlan
from seqattn_jax.prefix_cache import Admission, EvictResult, PrefixCache, PrefixCacheStats, freed_pages
from seqattn_jax.reference_backend import ReferenceBackend
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
    # cache state and the allocator
    "CacheConfig", "CacheState", "Status", "allocate", "allocate_decoding", "fork", "init_state",
    "ref", "release", "share_prefix", "state_from_page_table", "truncate", "unref",
    # batches and the page pool
    "PackedBatch", "append_kv", "copy_pages", "init_kv", "pack_for_flashinfer", "scrub_pages",
    # attention: options, backends, plans, runs
    "AttentionOptions", "AttentionPlan", "Backend", "HostPlan", "ReferenceBackend", "adopt_plan",
    "batch_decode", "batch_pod", "batch_prefill", "default_backend", "host_plan_batch_pod",
    "host_plan_decode", "host_plan_prefill", "plan_batch_pod", "plan_decode", "plan_pod",
    "plan_prefill", "pod",
    # prefix cache and head ids
    "Admission", "EvictResult", "PrefixCache", "PrefixCacheStats", "freed_pages",
    "HeadIDGenerator", "head_ids", "split_head_ids",
    # the allocator's error surface
    "AllocatorError", "ok", "raise_for_status",
]

"""Write a random Llama-family checkpoint in the Hugging Face layout (for load-time and serving figures).

    python benchmarks/write_random_checkpoint.py --out /tmp/llama1b                  # Llama-3.2-1B shape
    python benchmarks/write_random_checkpoint.py --out /tmp/tiny --preset tiny --time-load

Writes config.json (architecture LlamaForCausalLM, llama3 rope scaling, tied embeddings as Llama 3.2
1B), generation_config.json, model.safetensors or shards of at most --shard-gb with
model.safetensors.index.json (HF tensor names, `[out, in]` weights, q/k/v and gate/up separate), and a
word-level tokenizer.json whose vocabulary is the words `w3 .. w{V-1}` (plus <s>, </s>, <unk>), so
text in / text out works end to end ("w17 w4 w99" encodes to those ids; other words to <unk>). Nothing is downloaded.

Weights are numpy normal draws with the scales of `seqattn_jax.models.llama.init_params` (kernels
1/sqrt(n_in), o/down further 1/sqrt(2L)), so greedy decoding is not degenerate.
`--time-load` then loads it with `seqattn_jax.models.hf.load_hf_checkpoint` twice and prints the
seconds (the first includes compiling the small fuse/transpose programs; the OS page cache is warm
for both, since the files were just written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    # meta-llama/Llama-3.2-1B's config.json shape: 1.24B parameters.
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 16, "vocab_size": 128256, "head_dim": 64,
           "tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    # meta-llama/Llama-3.1-8B's shape: 8.03B parameters (16 GB in bfloat16).
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "head_dim": 128,
           "tie_word_embeddings": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    # A few MB: the CPU machine's figure.
    "tiny": {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 2048, "head_dim": 64,
             "tie_word_embeddings": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
             "rope_scaling": None},
}


def tensor_specs(c: dict):
    """(name, shape, std) of every tensor, in the order they are written."""
    d, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd, hq, hkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    depth = 1.0 / math.sqrt(2 * n)
    embed_std = 4.0 / math.sqrt(d) if c["tie_word_embeddings"] else 1.0
    yield "model.embed_tokens.weight", (v, d), embed_std
    for i in range(n):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,), None
        yield p + "self_attn.q_proj.weight", (hq * hd, d), 1 / math.sqrt(d)
        yield p + "self_attn.k_proj.weight", (hkv * hd, d), 1 / math.sqrt(d)
        yield p + "self_attn.v_proj.weight", (hkv * hd, d), 1 / math.sqrt(d)
        yield p + "self_attn.o_proj.weight", (d, hq * hd), depth / math.sqrt(hq * hd)
        yield p + "post_attention_layernorm.weight", (d,), None
        yield p + "mlp.gate_proj.weight", (f, d), 1 / math.sqrt(d)
        yield p + "mlp.up_proj.weight", (f, d), 1 / math.sqrt(d)
        yield p + "mlp.down_proj.weight", (d, f), depth / math.sqrt(f)
    yield "model.norm.weight", (d,), None
    if not c["tie_word_embeddings"]:
        yield "lm_head.weight", (v, d), 4.0 / math.sqrt(d)


def write_tokenizer(out: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(os.path.join(out, "tokenizer.json"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory to write (created)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="dtype of the stored tensors (config.json torch_dtype)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="largest shard; more means shards + index")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-load", action="store_true", help="then time load_hf_checkpoint (twice)")
    ap.add_argument("--load-dtype", default="float16", help="compute dtype for --time-load")
    args = ap.parse_args(argv)

    import ml_dtypes
    from safetensors.numpy import save_file

    c = dict(PRESETS[args.preset])
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "bos_token_id": 0, "eos_token_id": 1, "max_position_embeddings": 131072,
              "torch_dtype": args.dtype, "attention_bias": False, "mlp_bias": False, **c}
    os.makedirs(args.out, exist_ok=True)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[args.dtype]
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    # Plan the shards from the sizes, then draw and write one shard at a time (bounded memory).
    itemsize = np.dtype(np_dtype).itemsize
    specs = list(tensor_specs(c))
    limit = int(args.shard_gb * 2**30)
    plan, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize
        if plan[-1] and size + nbytes > limit:
            plan.append([])
            size = 0
        plan[-1].append(spec)
        size += nbytes
    total = sum(math.prod(shape) for _, shape, _ in specs) * itemsize
    params = sum(math.prod(shape) for _, shape, _ in specs)
    weight_map = {}
    for i, shard_specs in enumerate(plan):
        file = "model.safetensors" if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name, shape, std in shard_specs:
            x = np.ones(shape, np.float32) if std is None else \
                rng.standard_normal(shape, np.float32) * np.float32(std)
            shard[name] = x.astype(np_dtype)
        save_file(shard, os.path.join(args.out, file))
        weight_map |= {n: file for n in shard}
        del shard
    shards = plan
    if len(plan) > 1:
        with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": [1]}, f, indent=1)
    write_tokenizer(args.out, c["vocab_size"])
    print(f"wrote {args.out}: {args.preset} ({params / 1e9:.3f}B params, {total / 2**30:.2f} GiB "
          f"{args.dtype}, {len(shards)} file(s)) in {time.perf_counter() - t0:.1f} s")

    if args.time_load:
        import jax

        from seqattn_jax.models.hf import load_hf_checkpoint

        for attempt in ("first (compiles the fuse programs)", "second"):
            t0 = time.perf_counter()
            cfg, loaded = load_hf_checkpoint(args.out, dtype=args.load_dtype)
            jax.block_until_ready(loaded)
            dt = time.perf_counter() - t0
            print(f"load_hf_checkpoint {attempt}: {dt:.2f} s ({total / 2**30 / dt:.2f} GiB/s of "
                  f"{args.dtype} files) -> {cfg.dtype} on {jax.devices()[0].platform}")
            del loaded


if __name__ == "__main__":
    main()

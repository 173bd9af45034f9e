"""examples/serve_hf.py on a tiny random checkpoint written here (HF layout through
tests/test_hf_loader.py's tensors, a word-level tokenizer.json over the whole vocabulary, the same
as benchmarks/write_random_checkpoint.py's, which the sdist does not carry): the served greedy tokens
equal the dense model's greedy continuation of each prompt, the streamed text is the tokenizer's
decoding, an EOS id the model produces stops its request, and a bad --model exits 2 naming the
problem. Reference backend, float32; nothing is downloaded."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors.numpy", reason="safetensors (the optional extra 'hf') is not installed")
pytest.importorskip("tokenizers", reason="tokenizers (the optional extra 'hf') is not installed")
pytest.importorskip("rich", reason="rich (the optional extra 'example') is not installed")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from seqattn_jax.models import llama  # noqa: E402
from seqattn_jax.models.hf import load_hf_checkpoint, load_tokenizer  # noqa: E402
from tests.test_hf_loader import hf_tensors  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "serve_hf.py"

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 256,
          "tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
          "rope_scaling": None, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32"}
# Word-level vocabulary: <s>=0, </s>=1, <unk>=2, then "w3" .. "w255" are ids 3 .. 255.
PROMPTS = ["w5 w6 w7",
           "w100 w3 w42 w9 w17 w200 w201 w13 w14 w15 w16 w18 w19 w20 w21 w22 w23 w24",  # > one chunk
           "w5 w6 w7 w8 w9 w10 w11 w12 w13 w250"]
MAX_NEW = 8
# One cache shape for every run here, so the step programs compile once for the module.
SERVE = ["--backend", "reference", "--dtype", "float32", "--batch", "2", "--chunk", "16",
         "--page-size", "8", "--num-pages", "16", "--max-new-tokens", str(MAX_NEW)]


def write_tokenizer(path: pathlib.Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))


def write_checkpoint(path: pathlib.Path, eos=1) -> str:
    path.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(CONFIG, seed=0), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": eos}))
    write_tokenizer(path, CONFIG["vocab_size"])
    return str(path)


@pytest.fixture(scope="module")
def serve():
    spec = importlib.util.spec_from_file_location("serve_hf_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def dense_greedy(path: str, prompt_ids: list[int], n: int, stops) -> list[int]:
    """The dense, cache-free model's greedy continuation (through the first stop id, inclusive)."""
    cfg, params = load_hf_checkpoint(path, dtype="float32", backend="reference")  # head_dim 16
    ids, out = list(prompt_ids), []
    width = len(prompt_ids) + n  # one padded shape: causal, so trailing padding changes nothing
    for _ in range(n):
        toks = np.zeros((1, width), np.int32)
        toks[0, :len(ids)] = ids
        logits = llama.dense_logits(params, cfg, jnp.asarray(toks))
        out.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
        ids.append(out[-1])
        if out[-1] in stops:
            break
    return out


def continuation_text(tok, prompt_ids, gen) -> str:
    """What the stream should print: the decoding of prompt + generated (stop ids dropped) past the
    prompt's own decoding."""
    gen = [t for t in gen if not tok.is_eos(t)]
    return tok.decode(prompt_ids + gen)[len(tok.decode(prompt_ids)):]


def test_greedy_equals_dense_and_text_decodes(serve, ckpt, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(PROMPTS[2] + "\n\n")  # blank lines are skipped
    out = io.StringIO()
    res = serve.run(["--model", ckpt, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                     "--prompts-file", str(prompts_file), *SERVE], out=out)
    tok = load_tokenizer(ckpt)
    assert [r.prompt for r in res.requests] == PROMPTS
    assert res.eos_ids == (1,) and res.pages_in_use_at_end == 0 and res.compiles_serving == 0
    printed = out.getvalue().splitlines()
    assert len(printed) == len(PROMPTS)
    for r in res.requests:
        assert r.prompt_ids == tok.encode(r.prompt) and r.prompt_ids[0] == 0  # BOS
        want = dense_greedy(ckpt, r.prompt_ids, MAX_NEW, tok.eos_ids)
        assert r.tokens == want, (r.rid, r.tokens, want)
        assert r.finish_reason == ("stop" if want[-1] in tok.eos_ids else "length")
        assert r.text == continuation_text(tok, r.prompt_ids, r.tokens)
        assert r.text.split() == [f"w{t}" for t in r.tokens if t not in tok.eos_ids]
        assert f"[{r.rid}] {r.prompt}{r.text}  ({len(r.tokens)} tokens, {r.finish_reason})" in printed
    assert res.stats.generated_tokens == res.generated_tokens


def test_one_prompt_streams_on_one_line_and_eos_stops(serve, ckpt, tmp_path, capsys):
    tok = load_tokenizer(ckpt)
    ids = tok.encode(PROMPTS[1])
    free = dense_greedy(ckpt, ids, MAX_NEW, ())
    # An EOS the model really produces: its third greedy token (the first occurrence of that id).
    eos = free[2]
    stop_at = free.index(eos)
    assert 0 < stop_at < MAX_NEW - 1  # stops mid-way (true for this seed: no repeat before it)
    eos_dir = tmp_path / "eos"
    shutil.copytree(ckpt, eos_dir)
    (eos_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))

    assert serve.main(["--model", str(eos_dir), "--prompt", PROMPTS[1], *SERVE]) == 0
    text = capsys.readouterr().out
    want_text = continuation_text(load_tokenizer(str(eos_dir)), ids, free[:stop_at + 1])
    assert text.startswith(PROMPTS[1] + want_text + "\n")   # the stop word itself is not printed
    assert f"w{eos}" not in want_text.split()
    assert "1 served (1 stop)" in text and f"{stop_at + 1} generated" in text

    res = serve.run(["--model", str(eos_dir), "--prompt", PROMPTS[1], "--quiet", *SERVE])
    (r,) = res.requests
    assert res.eos_ids == (eos, 1) and r.finish_reason == "stop" and r.tokens == free[:stop_at + 1]
    # --ignore-eos: the full length again
    res = serve.run(["--model", str(eos_dir), "--prompt", PROMPTS[1], "--quiet", "--ignore-eos", *SERVE])
    assert res.requests[0].tokens == free and res.requests[0].finish_reason == "length"


def _exit_2(serve, argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        serve.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err


def test_bad_model_and_options_exit_2(serve, ckpt, tmp_path, capsys):
    _exit_2(serve, ["--model", str(tmp_path / "nowhere"), "--prompt", "w5"], capsys,
            "--model", "not a directory")
    (tmp_path / "empty").mkdir()
    _exit_2(serve, ["--model", str(tmp_path / "empty"), "--prompt", "w5"], capsys, "no config.json")
    bad = tmp_path / "gelu"
    shutil.copytree(ckpt, bad)
    (bad / "config.json").write_text(json.dumps(CONFIG | {"hidden_act": "gelu"}))
    _exit_2(serve, ["--model", str(bad), "--prompt", "w5", *SERVE], capsys, "hidden_act")
    os.remove(ckpt_file := bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(CONFIG))
    assert not ckpt_file.exists()
    _exit_2(serve, ["--model", str(bad), "--prompt", "w5", *SERVE], capsys, "--model")
    _exit_2(serve, ["--model", ckpt], capsys, "no prompts")
    _exit_2(serve, ["--model", ckpt, "--prompt", "w5", "--max-new-tokens", "0"], capsys,
            "--max-new-tokens must be positive")

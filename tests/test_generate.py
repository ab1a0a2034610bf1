"""Generation: KV cache equals recomputation, sampling controls, reading a run, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmtrain.errors import UserError
from lmtrain.generate import generate, latest_checkpoint, load_model, main, sample_next
from lmtrain.model import Transformer, TransformerModelArgs


def make_model(seed: int = 0, **overrides) -> Transformer:
    kwargs = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, seq_len=48, multiple_of=32)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(TransformerModelArgs(**kwargs)).eval()
    with torch.no_grad():
        model.output.weight.mul_(30)  # peaked distributions, so greedy choices are far from ties
    return model


@pytest.mark.parametrize(
    "overrides", [{}, {"pos": "learned", "norm": "layernorm", "mlp": "gelu"}], ids=["llama", "gpt2-style"]
)
def test_kv_cache_greedy_equals_recomputation(overrides):
    model = make_model(**overrides)
    prompt = torch.randint(0, 61, (2, 7))
    cached, cached_logits = generate(model, prompt, 30, temperature=0, use_cache=True, return_logits=True)
    plain, plain_logits = generate(model, prompt, 30, temperature=0, use_cache=False, return_logits=True)
    assert cached.shape == (2, 37)
    assert torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert len(set(cached[0, 7:].tolist())) > 1  # not a degenerate constant output


def test_generation_past_the_context_slides_the_window_identically():
    model = make_model(seq_len=16)
    prompt = torch.randint(0, 61, (1, 10))
    cached = generate(model, prompt, 15, temperature=0, use_cache=True)
    plain = generate(model, prompt, 15, temperature=0, use_cache=False)
    assert cached.shape == (1, 25)
    assert torch.equal(cached, plain)


def test_prefill_in_chunks_matches_full_forward():
    """Chunks after a prefix need the offset causal mask: query t sits at position start_pos + t."""
    model = make_model()
    tokens = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(2)
        parts = [model(tokens[:, :8], cache=cache), model(tokens[:, 8:15], cache=cache, start_pos=8)]
        parts += [model(tokens[:, t : t + 1], cache=cache, start_pos=t) for t in range(15, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_cache_holds_kv_heads_not_repeated_heads():
    model = make_model()
    cache = model.new_kv_cache(3)
    assert len(cache) == 2
    assert cache[0].k.shape == (3, 2, 48, 16)  # (B, n_kv_heads, seq_len, head_dim)


def test_prompt_longer_than_context():
    model = make_model(seq_len=16)
    with pytest.raises(UserError, match="prompt has 17 tokens, longer than the model's context of 16"):
        generate(model, list(range(17)), 3)


def test_sampling_controls():
    model = make_model()
    prompt = [1, 2, 3]
    greedy = generate(model, prompt, 12, temperature=0)
    assert greedy.shape == (15,)
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_p=1e-6), greedy)

    def sample(seed: int) -> torch.Tensor:
        return generate(model, prompt, 12, temperature=5.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_top_k_and_top_p_only_keep_the_likely_tokens():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    top_k = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert top_k == {0, 1}
    # softmax = [.64, .23, .01, .004, .09]: top_p=0.8 keeps the first two (0.64 < 0.8 <= 0.87).
    top_p = {int(sample_next(logits, 1.0, top_p=0.8, generator=gen)) for _ in range(200)}
    assert top_p == {0, 1}


def test_eos_stops_generation():
    model = make_model()
    prompt = [5, 6, 7]
    greedy = generate(model, prompt, 10, temperature=0)
    stop = int(greedy[5])  # the third generated token
    out = generate(model, prompt, 10, temperature=0, eos_id=stop)
    first = greedy[3:].tolist().index(stop)
    assert out.tolist() == greedy[: 3 + first + 1].tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "--temperature must be >= 0"),
        (dict(top_k=0), "--top-k must be >= 1"),
        (dict(top_p=1.5), r"--top-p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        generate(make_model(), [1], 3, **kwargs)


# ---- runs on disk ----------------------------------------------------------------------------------


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "def main(): return 0", "hello world"] * 20
    core.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(path)
    return tok


def write_run(tmp_path: Path, model: Transformer, step: int, model_args: dict | None = None) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    state = {
        "model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},  # as a compiled model saves
        "model_args": model_args or model.args.to_dict(),
        "step": step,
        "optimizer": {},
    }
    torch.save(state, run / "checkpoints" / f"step-{step:08d}.pt")
    return run


def test_cli_streams_greedy_text_from_the_latest_checkpoint(tmp_path, capsys):
    tok = build_tokenizer(tmp_path / "run" / "tokenizer")
    old = make_model(seed=1, vocab_size=len(tok))
    model = make_model(seed=2, vocab_size=len(tok))
    write_run(tmp_path, old, 5)
    run = write_run(tmp_path, model, 40)
    assert latest_checkpoint(run).name == "step-00000040.pt"
    loaded, ckpt = load_model(latest_checkpoint(run))
    assert ckpt["step"] == 40
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)

    prompt = "hello world"
    assert main(["--run", str(run), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert "step-00000040.pt" in out.err
    ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    expected = generate(model, ids, 12, temperature=0, eos_id=[tok.eos_token_id, tok.bos_token_id])
    new = [t for t in expected[len(ids) :].tolist() if t not in (tok.eos_token_id, tok.bos_token_id)]
    assert out.out == prompt + tok.decode(new, skip_special_tokens=True) + "\n"


def test_checkpoint_from_a_different_config_names_the_differences(tmp_path):
    model = make_model()
    other_args = dict(model.args.to_dict(), n_layers=3, dim=32)
    run = write_run(tmp_path, model, 1, model_args=other_args)
    with pytest.raises(UserError) as err:
        load_model(latest_checkpoint(run))
    message = str(err.value)
    assert "missing keys: layers.2.attention_norm.weight" in message
    assert "tok_embeddings.weight: checkpoint (61, 64) vs model (61, 32)" in message


def test_run_without_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no checkpoint in .*step-XXXXXXXX.pt"):
        latest_checkpoint(tmp_path)
    with pytest.raises(UserError, match="no such directory"):
        main(["--run", str(tmp_path / "absent")])


def test_cli_falls_back_past_an_unreadable_newest_checkpoint_and_takes_step(tmp_path, capsys):
    tok = build_tokenizer(tmp_path / "run" / "tokenizer")
    older, newer = make_model(seed=1, vocab_size=len(tok)), make_model(seed=2, vocab_size=len(tok))
    write_run(tmp_path, older, 5)
    run = write_run(tmp_path, newer, 40)
    argv = ["--run", str(run), "--prompt", "hello", "--max-new-tokens", "3", "--temperature", "0"]
    assert main([*argv, "--step", "5"]) == 0
    assert "# step-00000005.pt (step 5)" in capsys.readouterr().err
    (run / "checkpoints" / "step-00000040.pt").write_bytes(b"PK\x03\x04 cut short by a killed copy")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "step-00000040.pt" in err and "trying the previous" in err
    assert "# step-00000005.pt (step 5)" in err
    with pytest.raises(UserError, match=r"no checkpoint of step 7 .* it has steps \[5, 40\]"):
        main([*argv, "--step", "7"])
    (run / "checkpoints" / "step-00000005.pt").write_bytes(b"")
    with pytest.raises(UserError, match="none of the 2 checkpoints"):
        main(argv)


# --------------------------------------------------------------------------------------------------
# Decode-time weight layout and the decoding benchmark's contenders
# --------------------------------------------------------------------------------------------------


def test_decode_layout_is_column_major_inside_and_row_major_after():
    from lmtrain.generate import decode_layout

    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for _, p in model.named_parameters()]
    with decode_layout(model):
        w = model.output.weight
        assert w.shape == (61, 64) and w.stride() == (1, 61)  # (out, in) stored as its transpose
        ffn, attention = model.layers[0].feed_forward, model.layers[0].attention
        hidden = ffn.w1.weight.shape[0]
        # w1 and w3 are the two row halves of one column-major (2 hidden, in) weight
        assert ffn.w13.shape == (2 * hidden, 64) and ffn.w13.stride() == (1, 2 * hidden)
        assert ffn.w1.weight.data_ptr() == ffn.w13.data_ptr()
        assert torch.equal(ffn.w3.weight, ffn.w13[hidden:])
        assert attention.wqkv.shape[0] == sum(
            getattr(attention, n).weight.shape[0] for n in ("wq", "wk", "wv")
        )
        assert torch.equal(attention.wv.weight, before["layers.0.attention.wv.weight"])
        assert torch.equal(w, before["output.weight"])
        assert model.layers[0].attention.wo.weight.stride() == (1, 64)
    assert ffn.w13 is None and attention.wqkv is None
    after = model.state_dict()
    assert all(after[k].is_contiguous() and torch.equal(after[k], before[k]) for k in before)
    assert [p for _, p in model.named_parameters()] == params  # the same Parameter objects


@pytest.mark.parametrize(
    "overrides", [{}, {"parallel_block": True}, {"norm_position": "post", "n_kv_heads": 4}]
)
def test_decode_layout_forward_matches_the_training_layout(overrides):
    """The fused projections and plain products of the decode layout compute the same function."""
    from lmtrain.generate import decode_layout

    model = make_model(**overrides)
    tokens = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        reference = model(tokens)
        with decode_layout(model):
            cache = model.new_kv_cache(2)
            prefill = model(tokens[:, :9], cache=cache)
            steps = [model(tokens[:, t : t + 1], cache=cache, start_pos=t) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_decode_linear_gives_the_bits_of_f_linear(blocks):
    from lmtrain.model import decode_linear

    weight = torch.randn(96, 40).t().contiguous().t()  # (out, in), column-major as decode_layout stores it
    for x in (torch.randn(1, 1, 40), torch.randn(40), torch.randn(3, 5, 40)):  # a token, a vector, a prompt
        assert torch.equal(decode_linear(x, weight, blocks), torch.nn.functional.linear(x, weight))
    row_major = weight.contiguous()  # not the decode layout: plain F.linear
    x = torch.randn(1, 1, 40)
    assert torch.equal(decode_linear(x, row_major, blocks), torch.nn.functional.linear(x, row_major))


def test_decode_layout_gives_one_column_block_per_thread_where_sizes_divide():
    from lmtrain.generate import decode_layout

    model, threads = make_model(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with decode_layout(model):
            assert model.layers[0].attention.blocks == 2 and model.layers[0].feed_forward.blocks == 2
            assert model.output_blocks == 1  # a vocabulary of 61 does not split in two
            prompt = torch.randint(0, 61, (1, 5))
            tokens = generate(model, prompt, 12, temperature=0)
        assert model.layers[0].attention.blocks == 1 and model.output_blocks == 1
        torch.set_num_threads(1)
        assert torch.equal(generate(model, prompt, 12, temperature=0), tokens)
    finally:
        torch.set_num_threads(threads)


def test_decode_layout_is_restored_when_decoding_fails():
    from lmtrain.generate import decode_layout

    model = make_model()
    with pytest.raises(RuntimeError, match="stop"), decode_layout(model):
        raise RuntimeError("stop")
    assert model.output.weight.is_contiguous()


def _bench_generate():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_greedy_tokens_identical_for_lmtrain_minimal_loop_and_transformers():
    pytest.importorskip("transformers")
    bench = _bench_generate()
    model = make_model(seq_len=64)
    prompt = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(3))
    outputs = {name: decode(prompt, 40) for name, decode in bench.decoders(model).items()}
    assert set(outputs) == {"lmtrain cached", "lmtrain recompute", "minimal loop", "transformers"}
    reference = outputs["lmtrain cached"]
    assert reference.shape == (1, 49) and len(set(reference[0, 9:].tolist())) > 1
    for name, out in outputs.items():
        assert bench.first_difference(reference, out) is None, name


def test_first_difference_finds_the_first_differing_position():
    bench = _bench_generate()
    a = torch.tensor([[1, 2, 3, 4]])
    assert bench.first_difference(a, a.clone()) is None
    assert bench.first_difference(a, torch.tensor([[1, 2, 9, 4]])) == 2
    assert bench.first_difference(a, torch.tensor([[1, 2, 3]])) == 3

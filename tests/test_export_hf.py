"""Hugging Face export: the converted LlamaForCausalLM gives the same logits as the lmtrain model."""

from __future__ import annotations

import pytest
import torch

from lmtrain.errors import UserError
from lmtrain.export_hf import interleaved_to_half_split, main, to_hf_model, to_hf_state_dict
from lmtrain.model import Transformer, TransformerModelArgs
from tests.test_generate import build_tokenizer, write_run


def random_llama(vocab_size: int = 83, **overrides) -> Transformer:
    kwargs = dict(
        dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=vocab_size, seq_len=64, multiple_of=32
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = Transformer(TransformerModelArgs(**kwargs, rope_theta=10000.0, norm_eps=1e-6)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights, so a misplaced norm shows in the logits
            else:
                p.mul_(5)  # larger weights: attention patterns far from uniform, so RoPE errors show
    return model


def test_permutation_moves_pairs_to_halves():
    w = torch.arange(8.0)[:, None].repeat(1, 3)  # 2 heads x head_dim 4, rows labelled by index
    assert interleaved_to_half_split(w, n_heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_hf_logits_equal_lmtrain_logits():
    from transformers import LlamaForCausalLM

    model = random_llama()
    hf = to_hf_model(model)
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.config.num_key_value_heads == 2 and hf.config.intermediate_size == model.args.ffn_hidden_dim
    tokens = torch.randint(0, 83, (2, 40))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.std() > 0.5  # logits are far from zero, so the comparison is meaningful


def test_without_the_permutation_logits_differ():
    """The RoPE permutation is necessary: a plain rename gives other logits."""
    from transformers import LlamaForCausalLM

    model = random_llama()
    hf = to_hf_model(model)
    sd = to_hf_state_dict(model.state_dict(), model.args)
    for i in range(model.args.n_layers):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = model.layers[i].attention.wq.weight.detach()
        sd[f"model.layers.{i}.self_attn.k_proj.weight"] = model.layers[i].attention.wk.weight.detach()
    wrong = LlamaForCausalLM(hf.config).eval()
    wrong.load_state_dict(sd)
    tokens = torch.randint(0, 83, (1, 40))
    with torch.no_grad():
        assert (model(tokens) - wrong(tokens).logits).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "switch, shown",
    [
        ({"norm": "layernorm"}, "norm=layernorm"),
        ({"norm": "none"}, "norm=none"),
        ({"mlp": "gelu"}, "mlp=gelu"),
        ({"mlp": "gelu_exact"}, "mlp=gelu_exact"),
        ({"mlp": "silu"}, "mlp=silu"),
        ({"pos": "learned"}, "pos=learned"),
        ({"pos": "none"}, "pos=none"),
        ({"norm_position": "post"}, "norm_position=post"),
        ({"parallel_block": True}, "parallel_block=true"),
    ],
)
def test_ablation_switches_do_not_export(switch, shown):
    model = random_llama(**switch)
    with pytest.raises(UserError, match=f"model.{shown} cannot be exported as LlamaForCausalLM"):
        to_hf_model(model)


def test_explicit_d_ff_and_dropout_export_with_the_same_logits():
    """d_ff is LlamaForCausalLM's intermediate_size; dropout acts only in training."""
    model = random_llama(d_ff=72, dropout=0.2).eval()
    hf = to_hf_model(model)
    assert hf.config.intermediate_size == 72
    tokens = torch.randint(0, model.args.vocab_size, (1, 20))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_cli_exports_a_run_that_transformers_loads(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = build_tokenizer(tmp_path / "run" / "tokenizer")
    model = random_llama(vocab_size=len(tok))
    run = write_run(tmp_path, model, 7)
    out = tmp_path / "hf"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok("hello world", return_tensors="pt").input_ids
    assert ids.tolist()[0] == tok("hello world").input_ids
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    assert hf.config.bos_token_id == tok.bos_token_id

    with pytest.raises(UserError, match="exists and is not empty"):
        main(["--run", str(run), "--out", str(out)])
    assert main(["--run", str(run), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary leftovers


def test_cli_out_errors_and_step_and_shared_permissions(tmp_path):
    import os

    tok = build_tokenizer(tmp_path / "run" / "tokenizer")
    model = random_llama(vocab_size=len(tok))
    write_run(tmp_path, random_llama(vocab_size=len(tok), n_layers=1), 3)
    run = write_run(tmp_path, model, 7)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        main(["--run", str(run), "--out", str(a_file)])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if not os.access(locked, os.W_OK):  # root may write anywhere
        with pytest.raises(UserError, match="cannot write in .*locked"):
            main(["--run", str(run), "--out", str(locked / "hf")])
    old = os.umask(0o022)
    try:
        (run / "checkpoints" / "step-00000007.pt").write_bytes(b"")  # unreadable newest: falls back
        assert main(["--run", str(run), "--out", str(tmp_path / "hf"), "--step", "3"]) == 0
    finally:
        os.umask(old)
    assert oct((tmp_path / "hf").stat().st_mode & 0o777) == "0o755"  # mkdir's mode, not mkdtemp's 0700
    from transformers import LlamaConfig

    assert LlamaConfig.from_pretrained(tmp_path / "hf").num_hidden_layers == 1  # the step-3 model

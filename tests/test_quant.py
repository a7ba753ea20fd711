"""Weight-only int8 / int4 quantization (llama/quant.py): the formulas, the layers against the dequantized weight's
matmul, checkpoints written by `llama quantize`, bad arguments, and the quality on the real SmolLM2 weights against
transformers' perplexity by the definition in llama/perplexity.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import official_config, relative_error, shrink, write_hf_checkpoint

import llama
from llama import cpu_kernels, quant
from llama.cli import main
from llama.perplexity import windows
from llama.quant import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

TEXT = Path("/usr/share/common-licenses/GPL-3")  # real English prose, in Debian's base-files everywhere


# ---------------------------------------------------------------------------- the formulas
def test_int8_is_symmetric_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(7, 50) * torch.rand(7, 1) * 3
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (7,)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)  # scale = max |w| / 127, row by row
    assert torch.equal(q, torch.round(w / scale[:, None]).to(torch.int8))
    error = (dequantize_int8(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5)).all()  # round to nearest: at most half a step
    assert torch.equal(q.abs().amax(1), torch.full((7,), 127, dtype=torch.int8))  # the largest |w| is exact


def test_int4_reproduces_a_weight_already_on_a_4_bit_grid_per_group():
    # The SmolLM2 weights came from GGUF Q4_1 blocks of 32: q * d + m. A correct grouping finds each block's grid.
    torch.manual_seed(0)
    G = 32
    q = torch.randint(0, 16, (6, 4 * G))
    q[:, ::G], q[:, 1::G] = 0, 15  # every group spans the whole grid
    d, m = torch.rand(6, 4) + 0.1, torch.randn(6, 4)
    w = q * d.repeat_interleave(G, 1) + m.repeat_interleave(G, 1)
    qweight, scales, mins = quantize_int4(w, G)
    assert qweight.shape == (6, 2 * G) and qweight.dtype == torch.uint8
    torch.testing.assert_close(scales, d, rtol=1e-6, atol=0)
    torch.testing.assert_close(mins, m, rtol=0, atol=1e-6)
    assert torch.equal(quant.unpack_int4(qweight).long(), q)  # low nibble = even feature
    torch.testing.assert_close(dequantize_int4(qweight, scales, mins, G, 4 * G), w, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("G", [32, 64, 128, 256])
def test_int4_error_is_at_most_half_a_step_and_groups_keep_their_extremes(G):
    torch.manual_seed(G)
    K = 3 * G + G // 2  # not a multiple of G: the last group is padded
    w = torch.randn(5, K)
    qweight, scales, mins = quantize_int4(w, G)
    assert scales.shape == (5, 4) and qweight.shape == (5, 2 * G)
    back = dequantize_int4(qweight, scales, mins, G, K)
    assert back.shape == w.shape
    step = scales.repeat_interleave(G, 1)[:, :K]
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    for g in range(4):
        group = w[:, g * G:(g + 1) * G]
        torch.testing.assert_close(mins[:, g], group.amin(1))
        torch.testing.assert_close(scales[:, g], (group.amax(1) - group.amin(1)) / 15)


# ---------------------------------------------------------------------------- the layers
def _filled(layer, w):
    layer.load_rows_(0, w)
    return layer


def _magnitudes(layer) -> torch.Tensor:
    """|q| s + |min| per weight: the size of the terms a float32 product of the layer sums (a weight near zero can
    be q s + min with both large, and the int4 kernels sum the two parts apart)."""
    if isinstance(layer, Int8Linear):
        return layer.dequantized().abs()
    G, K = layer.group_size, layer.in_features
    q = quant.unpack_int4(layer.qweight).float()
    return (q * layer.scales.repeat_interleave(G, 1) + layer.mins.abs().repeat_interleave(G, 1))[:, :K]


@pytest.mark.parametrize("rows", [1, 5, 18])
@pytest.mark.parametrize("make", [lambda: Int8Linear(200, 70), lambda: Int4Linear(200, 70, group_size=32),
                                  lambda: Int4Linear(200, 70, group_size=128)], ids=["int8", "int4-g32", "int4-g128"])
def test_quantized_layer_equals_the_dequantized_weights_matmul(make, rows):
    """Against the dequantized weight's matmul in float64, within float32's rounding bound for sums of 200 terms
    (K u times the sum of the terms' sizes, u = 2^-24): on a CPU, 1 to 17 rows take the C++ kernels of
    cpu_kernels.py (70 rows: a last block of 2, 200 features: a tail past the vectors), 18 rows a dense matmul.
    The int4 kernel multiplies x rounded to 16 bits per block of 32 features by the nibbles q in integers (the
    mins meet x itself): its reference is that formula, spelled out here, and x itself is within ~1e-5 of it."""
    torch.manual_seed(rows)
    layer = _filled(make(), torch.randn(70, 200))
    x = torch.randn(2, rows, 200) * torch.rand(200) * 4  # (features of different sizes)
    expected = x.double() @ layer.dequantized().double().T
    bound = 200 * 2.0**-24 * (x.abs().double() @ _magnitudes(layer).double().T)
    got = layer(x).double()
    if isinstance(layer, Int4Linear) and rows <= cpu_kernels.MAX_ROWS:
        G, Kp = layer.group_size, layer.padded_in_features
        x_padded = torch.nn.functional.pad(x, (0, Kp - 200))
        blocks = x_padded.view(2, rows, -1, 32)
        most = blocks.abs().amax(-1, keepdim=True)  # float32, as the kernel: d = most / 32767, q = round(x 32767/most)
        x16 = torch.round(blocks * torch.where(most > 0, 32767 / most, 0)) * (most / 32767)
        q = unpack_int4(layer.qweight).double().view(70, -1, G) * layer.scales.double()[..., None]  # [N, Kp/G, G]
        from_q = (x16.double().view(2, rows, 1, -1, G) * q).sum((-1, -2))
        from_mins = (x_padded.double().view(2, rows, 1, -1, G).sum(-1) * layer.mins.double()).sum(-1)
        assert ((got - expected).abs() / expected.abs().max() < 1e-4).all()
        expected = from_q + from_mins
    assert ((got - expected).abs() <= bound).all()
    quant.use_reference(layer)
    assert ((layer(x).double() - (x.double() @ layer.dequantized().double().T)).abs() <= bound).all()


@pytest.mark.parametrize("make", [lambda: Int8Linear(200, 72), lambda: Int4Linear(200, 80, group_size=64)],
                         ids=["int8", "int4-g64"])
def test_without_the_cpu_kernels_the_layers_take_pytorch_paths(make, monkeypatch):
    """Where the C++ kernels cannot be built, one row goes through torch's weight-only ops and more rows through a
    dense matmul, within the same bound."""
    monkeypatch.setattr(cpu_kernels, "ops", lambda: None)
    torch.manual_seed(0)
    layer = _filled(make(), torch.randn(layer_rows := make().out_features, 200))
    layer.pack()
    assert not layer.native
    for rows in (1, 5):
        x = torch.randn(rows, 200)
        expected = x.double() @ layer.dequantized().double().T
        bound = 200 * 2.0**-24 * (x.abs().double() @ _magnitudes(layer).double().T)
        assert layer(x).shape == (rows, layer_rows) and ((layer(x).double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/c++"])
def test_a_failed_build_is_one_warning_and_no_kernels(compiler, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", compiler)
    with pytest.warns(UserWarning, match=r"the CPU kernels are not available \(.+\); quantized layers"):
        assert cpu_kernels.ops.__wrapped__() is None
    assert not list(tmp_path.rglob("*.so"))


def test_the_cpu_kernels_are_built_and_taken_for_few_float32_rows():
    """On this x86 CI machine the C++ kernels must build; they take float32 x of up to MAX_ROWS rows only."""
    assert cpu_kernels.ops() is not None
    layer = _filled(Int8Linear(64, 8), torch.randn(8, 64))
    layer.pack()
    assert layer.native and layer._native(torch.randn(17, 64), 17) and not layer._native(torch.randn(18, 64), 18)
    assert not layer._native(torch.randn(1, 64, dtype=torch.bfloat16), 1)
    bf16 = _filled(Int4Linear(64, 16, dtype=torch.bfloat16, group_size=32), torch.randn(16, 64))
    bf16.pack()
    assert not bf16.native  # (the kernels read float32 scales)


# ---------------------------------------------------------------------------- models and checkpoints
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_hf_checkpoint(folder, shrink(official_config("llama-3.2-1b"), intermediate_size=200))  # tied embeddings
    return folder


TOKENS = [[5, 9, 33, 7, 1, 2, 3, 4, 200, 201, 17, 19], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]


def _give_dequantized_weights(dense: torch.nn.Module, quantized: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, layer in quant.quantized_layers(quantized).items():
            module = dense.get_submodule(name)
            if name == "lm_head" and dense.lm_head.weight is dense.embed_tokens.weight:
                # tied: a copy of the embedding table, which itself stays dense
                torch.testing.assert_close(layer.dequantized(), dense.embed_tokens.weight, rtol=0,
                                           atol=layer.scales.max().item() / 2)
                module.weight = torch.nn.Parameter(layer.dequantized())
            else:
                module.weight.copy_(layer.dequantized())


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("int4", 64)])
def test_a_quantized_model_is_the_dense_model_with_dequantized_weights(tiny, mode, group):
    dense = llama.Llama.from_pretrained(tiny, device="cpu", progress=False)
    quantized = llama.Llama.from_pretrained(tiny, device="cpu", progress=False, quantize=mode, group_size=group)
    layers = quant.quantized_layers(quantized.model)
    assert set(layers) == {f"layers.{i}.{m}" for i in range(2) for m in (
        "attention.qkv_proj", "attention.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} | {"lm_head"}
    assert isinstance(layers["lm_head"], Int8Linear)  # the output projection is int8 in both modes
    _give_dequantized_weights(dense.model, quantized.model)  # the dense model must then compute the same
    torch.testing.assert_close(quantized.logits(TOKENS), dense.logits(TOKENS), rtol=1e-4, atol=1e-4)
    assert [r.token_ids for r in quantized.generate(TOKENS, max_new_tokens=8)] == \
        [r.token_ids for r in dense.generate(TOKENS, max_new_tokens=8)]


@pytest.mark.parametrize("mode,group,bias", [("int8", None, True), ("int4", 32, False), ("int4", 64, True)])
def test_fused_decode_blocks_are_the_dense_model_with_dequantized_weights(tmp_path, mode, group, bias):
    """On a CPU each block of a quantized decode step is one C++ call (quant.fuse_cpu_decode: norms, products,
    RoPE, cache write, attention). Against the dense model given the dequantized weights (itself checked against
    transformers): GQA (4 query heads a kv head), Llama 3.1's RoPE, biases, int4 groups that pad the features (200
    -> 224 or 256), three rows each at its own position, two steps: the logits and every cache entry written."""
    write_hf_checkpoint(tmp_path, shrink(official_config("llama-3.1-8b"), intermediate_size=200,
                                         attention_bias=bias, mlp_bias=bias))
    quantized = llama.Llama.from_pretrained(tmp_path, device="cpu", progress=False, quantize=mode, group_size=group)
    assert all(hasattr(block.forward, "unfused") for block in quantized.model.layers)
    dense = llama.Llama.from_pretrained(tmp_path, device="cpu", progress=False)
    _give_dequantized_weights(dense.model, quantized.model)
    torch.manual_seed(0)
    prompt, steps = torch.randint(0, 320, (3, 12)), torch.randint(0, 320, (2, 3, 1))
    positions = torch.tensor([[11], [6], [9]])  # (each row goes on from there, over what the prefill wrote)
    logits = {}
    with torch.inference_mode():
        for name, model in (("fused", quantized.model), ("dense", dense.model)):
            model.setup_cache(3, 32)
            model(prompt, torch.arange(12))
            logits[name] = [model(token, positions + i, span=12 + i) for i, token in enumerate(steps)]
    # int4's products take x rounded to 16 bits per block of 32 (~1e-5 each; 2e-4 here after two random blocks)
    bound = 1e-5 if mode == "int8" else 1e-3
    for fused, plain in zip(logits["fused"], logits["dense"]):
        assert relative_error(fused, plain) < bound
    for fused, plain in zip(quantized.model.layers, dense.model.layers):
        for name in ("k", "v"):
            assert relative_error(getattr(fused.attention.cache, name), getattr(plain.attention.cache, name)) < bound


def test_blocks_with_hooks_are_not_fused(tiny):
    """Tensor parallelism adds its all-reduce as a forward hook on o_proj and down_proj: a fused block would skip
    it, so a model with any hook on a product keeps the blocks' own forward."""
    model = llama.Llama.from_pretrained(tiny, device="cpu", progress=False, quantize="int8").model
    for block in model.layers:
        block.forward = block.forward.unfused
    model.layers[1].mlp.down_proj.register_forward_hook(lambda module, inputs, output: output)
    assert not quant.fuse_cpu_decode(model)
    assert not any(hasattr(block.forward, "unfused") for block in model.layers)


def test_gpu_fused_blocks_route_each_norm_and_residual_as_the_block_does(tiny):
    """quant.fuse_gpu_decode's blocks hand each norm and residual add to a product (`QuantizedLinear.fused`, whose
    one-row GPU kernels take them in: tests/test_quant_kernels.py checks those). On a CPU `fused` computes them as
    written, so with the blocks swapped in, a decode step of one token must give the very logits of the blocks' own
    forward (the two norms of each block given different weights), and two rows the same as before."""
    model = llama.Llama.from_pretrained(tiny, device="cpu", progress=False, quantize="int4", group_size=32).model
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.layers:
            block.forward = block.forward.unfused  # (the CPU's fused C++ blocks off)
            block.attention_norm.weight.uniform_(0.5, 1.5)
            block.mlp_norm.weight.uniform_(0.5, 1.5)
    assert not quant.fuse_gpu_decode(model)  # (CPU layers: it applies to GPU ones only)

    def decode(rows: int) -> list[torch.Tensor]:
        model.setup_cache(rows, 32)
        with torch.inference_mode():
            out = [model(torch.tensor(TOKENS[:rows]), torch.arange(12))]
            out += [model(torch.tensor([[t]] * rows), torch.full((rows, 1), 12 + i), span=13 + i)
                    for i, t in enumerate([7, 300, 42])]
        return out

    plain = [decode(1), decode(2)]
    for block in model.layers:
        block.forward = quant._fused_gpu_decode(block, block.forward)
    for fused, expected in zip([decode(1), decode(2)], plain):
        assert all(torch.equal(a, b) for a, b in zip(fused, expected))


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_compiled_quantized_decoding_is_eager_decoding(tiny, mode, group):
    """compile=True on a CPU: the layers, compiled for one token, call the C++ kernels inside the graph."""
    eager = llama.Llama.from_pretrained(tiny, device="cpu", progress=False, quantize=mode, group_size=group)
    compiled = llama.Llama.from_pretrained(tiny, device="cpu", progress=False, quantize=mode, group_size=group,
                                           compile=True)
    expected = eager.generate(TOKENS, max_new_tokens=12)
    answers = compiled.generate(TOKENS, max_new_tokens=12)
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_a_saved_quantized_checkpoint_loads_as_it_is_and_equals_quantizing_on_load(tiny, tmp_path, mode, group):
    args = ["quantize", "--model", str(tiny), "--quantize", mode, "--out", str(tmp_path), "--device", "cpu"]
    assert main(args + (["--group-size", str(group)] if group else [])) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "llamaref", "mode": mode, "group_size": group,
                                             "output": "int8", "modules_not_quantized": ["embed_tokens"]}
    on_load = llama.Llama.from_pretrained(tiny, device="cpu", progress=False, quantize=mode, group_size=group)
    saved = llama.Llama.from_pretrained(tmp_path, device="cpu", progress=False)  # no argument, no re-quantization
    assert torch.equal(saved.logits(TOKENS), on_load.logits(TOKENS))
    with pytest.raises(ValueError, match="already quantized"):
        llama.Llama.from_pretrained(tmp_path, device="cpu", progress=False, quantize="int8" if mode == "int4"
                                    else "int4")


def test_saved_file_sizes_are_the_quantized_tensors(smollm2_dir, tmp_path):
    """SmolLM2 (576 wide, 30 layers, 49,152 tokens, tied): int4 g32 stores 4 bits per weight plus a float32 scale
    and minimum per 32, the int8 output copy 1 byte per weight plus a scale per row, the embedding as it was."""
    assert main(["quantize", "--model", str(smollm2_dir), "--quantize", "int4", "--group-size", "32", "--out",
                 str(tmp_path), "--device", "cpu"]) == 0
    config = llama.ModelConfig.from_file(smollm2_dir / "config.json")
    C, F, V, L = config.dim, config.ffn_dim, config.vocab_size, config.n_layers
    H, K, D = config.n_heads, config.n_kv_heads, config.head_dim
    layer_weights = L * (C * (H + 2 * K) * D + H * D * C + 3 * C * F)
    expected = layer_weights * (0.5 + 8 / 32) + V * C * 4 + (V * C + V * 4) + (2 * L + 1) * C * 4
    written = (tmp_path / "model.safetensors").stat().st_size
    assert expected < written < expected + 200_000  # (+ the JSON header naming 694 tensors)
    assert written < 0.42 * (smollm2_dir / "model.safetensors").stat().st_size  # of the float32 source


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs,message", [
    (dict(quantize="int3"), "quantize='int3': choose from int8, int4"),
    (dict(quantize="int4", group_size=48), "group_size=48: choose from 32, 64, 128, 256"),
    (dict(quantize="int8", group_size=64), "group_size=64: int8 has one scale per output channel"),
    (dict(group_size=64), "group_size=64 needs quantize='int4'"),
])
def test_bad_quantize_arguments_are_value_errors_naming_them(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        llama.Llama.from_pretrained(tiny, device="cpu", progress=False, **kwargs)


def test_quantize_refuses_to_write_over_its_source(tiny, capsys):
    before = sorted(p.name for p in tiny.iterdir())
    assert main(["quantize", "--model", str(tiny), "--quantize", "int8", "--out", str(tiny)]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "holds another checkpoint" in err
    assert sorted(p.name for p in tiny.iterdir()) == before


def test_cli_rejects_group_size_without_int4(tiny, capsys):
    assert main(["generate", "--model", str(tiny), "--prompt", "1", "--group-size", "64"]) == 2
    assert capsys.readouterr().err.strip() == "llama: error: --group-size needs --quantize int4"


# ---------------------------------------------------------------------------- perplexity on real weights
def test_perplexity_windows_follow_the_definition():
    assert windows(list(range(10)), 4, bos_id=None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(list(range(9)), 4, bos_id=None) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # [8] has nothing to score
    assert windows(list(range(7)), 4, bos_id=99) == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6]]


@pytest.fixture(scope="module")
def text() -> str:
    return TEXT.read_text()[:12_000]  # 2,590 SmolLM2 tokens: six windows of 512 (and a short one)


@pytest.fixture(scope="module")
def fp32_perplexity(smollm2_dir, text) -> float:
    return llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False).perplexity(text, context=512)


def test_fp32_perplexity_equals_transformers_by_the_definition(smollm2_dir, smollm2_reference, text,
                                                               fp32_perplexity):
    llm = llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False)
    assert not llm.tokenizer.adds_bos  # SmolLM2: windows of 512 text tokens, the first of each unscored
    ids = llm.tokenizer.encode(text)
    nll, scored = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 512):
            window = torch.tensor([ids[start:start + 512]])
            if window.shape[1] < 2:
                continue
            logprobs = smollm2_reference(window).logits.double().log_softmax(-1)[0, :-1]
            nll -= logprobs.gather(-1, window[0, 1:, None]).sum().item()
            scored += window.shape[1] - 1
    assert abs(fp32_perplexity / math.exp(nll / scored) - 1) < 1e-4


@pytest.mark.parametrize("mode,group,bound", [("int8", None, 0.01), ("int4", 32, 0.03)])
def test_quantized_perplexity_is_close_to_fp32(smollm2_dir, text, fp32_perplexity, mode, group, bound):
    llm = llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False, quantize=mode, group_size=group)
    assert abs(llm.perplexity(text, context=512) / fp32_perplexity - 1) < bound


def test_perplexity_command_prints_the_value_and_the_reference_comparison(smollm2_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT.read_text()[:3000])
    assert main(["perplexity", "--model", str(smollm2_dir), "--text", str(tmp_path / "t.txt"), "--context", "256",
                 "--quantize", "int4", "--group-size", "32", "--reference"]) == 0
    out = capsys.readouterr().out
    value = float(out.split("perplexity: ")[1].split()[0])
    llm = llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False, quantize="int4", group_size=32)
    assert value == pytest.approx(llm.perplexity(TEXT.read_text()[:3000], context=256), rel=1e-4)
    assert "KL divergence from the reference" in out and "same top token" in out


def test_perplexity_command_names_a_missing_text_file(smollm2_dir, tmp_path, capsys):
    assert main(["perplexity", "--model", str(smollm2_dir), "--text", str(tmp_path / "nope.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"llama: error: --text {tmp_path / 'nope.txt'}: no such file"

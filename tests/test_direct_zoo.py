"""The direct rules on the layouts of torchvision, timm and Hugging Face transformers.

The models (tests/zoo_layouts.py) copy those libraries' structure (Llama's `model.layers` of
decoder layers calling `self_attn(hidden_states=...)`, BERT's post-norm `encoder.layer`,
DenseNet's ModuleDict block that iterates its children, squeezenet's pooled 1×1 conv head,
EfficientNet's stages of inverted residuals); the last tests build real `transformers`
models from tiny configs. Formulas in float64: a tap's input h_i receives e·B_i (dfa) or
−s·y*·B_i (drtp) at every position, and nothing where the label is ignored.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_layouts import Bertish, Decoder, MoeNet, SqueezeNet, StageNet, densenet, efficientnet, mobilenet

import feedalign
from feedalign.rules.dfa import Tap, target_signal


def _taps(model):
    return [m for m in model.modules() if isinstance(m, Tap) and m.rule]


def _sites(model):
    return [(t.site, t.cuts) if t.cuts != "input" else t.site for t in _taps(model)]


def _ids(n=3, t=5, vocab=13):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def _image(size=8):
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))


ZOO = {  # name: (build, input, sites with taps="macro")
    "decoder": (Decoder, _ids, ["model.layers.0", "model.layers.1", "lm_head"]),
    "tied": (lambda: Decoder(tied=True), _ids, ["model.layers.0", "model.layers.1", "lm_head"]),
    "bert": (Bertish, _ids, ["encoder.layer.0", "encoder.layer.1", "decoder"]),
    "densenet": (densenet, _image, ["features.denseblock1", "features.denseblock2", "classifier"]),
    "squeezenet": (SqueezeNet, _image, ["features.2", "features.3", "features.5", "classifier.1"]),
    "efficientnet": (efficientnet, _image, ["features.1.0", "features.2.0", "features.2.1", "classifier.1"]),
    "mobilenet": (mobilenet, _image, ["features.1", "features.2", "features.3", "classifier.1"]),
}


def _loss(y, labels):
    return F.cross_entropy(y.reshape(-1, y.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _labels(y):
    labels = torch.arange(y[..., 0].numel()).reshape(y.shape[:-1]) % y.shape[-1]
    if labels.dim() > 1:
        labels[:, -1] = -100  # the last position of every sequence is masked
    return labels


@pytest.mark.parametrize("rule", ["dfa", "drtp"])
@pytest.mark.parametrize("name", ZOO)
def test_blocks_are_the_repeated_layers_and_every_parameter_learns(name, rule):
    build, data, sites = ZOO[name]
    torch.manual_seed(0)
    plain = build()
    model = feedalign.convert(copy.deepcopy(plain), rule, seed=1)
    assert _sites(model) == sites
    assert set(plain.state_dict()) <= set(model.state_dict())
    assert all(k.endswith("dfa_output.feedback") for k in set(model.state_dict()) - set(plain.state_dict()))
    for twin in (model, copy.deepcopy(model)):  # the copy's hooks feed the copy's own taps
        y = twin(data())
        _loss(y, _labels(y)).backward()
        for n, p in twin.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert len(feedalign.feedback(model)) == len(sites)  # every tap has columns: none is fed ids


def test_taps_live_outside_every_container_and_survive_pickling():
    model = feedalign.convert(densenet(), "dfa", seed=0)
    assert list(model.features.denseblock1) == ["denselayer1", "denselayer2"]
    assert len(model.dfa_taps) == 3 and "dfa_taps" in repr(model)
    x = _image()
    F.cross_entropy(model(x), torch.arange(3)).backward()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.zero_grad()
    F.cross_entropy(loaded(x), torch.arange(3)).backward()
    for p, q in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(p.grad, q.grad)

    class Stack(nn.Sequential):  # its own forward: residual over its children
        def forward(self, x):
            for m in self:
                x = x + torch.tanh(m(x))
            return x

    net = nn.Sequential(nn.Linear(4, 6), Stack(nn.Linear(6, 6), nn.Linear(6, 6)), Stack(nn.Linear(6, 6)),
                        nn.Linear(6, 3))  # fmt: skip
    feedalign.convert(net, "dfa", seed=0, blocks=["1", "2"], output="3")
    assert [len(s) for s in (net[1], net[2])] == [2, 1] and _sites(net) == ["1", "2", "3"]
    F.cross_entropy(net(torch.randn(5, 4)), torch.arange(5) % 3).backward()


def test_nested_repetitions_give_one_tap_per_block_not_per_stage_or_expert():
    stages = feedalign.convert(StageNet(), "dfa", seed=0)
    assert _sites(stages) == [
        "stages.0.blocks.0",
        "stages.0.blocks.1",
        "stages.1.blocks.0",
        "stages.1.blocks.1",
        "head",
    ]
    moe = feedalign.convert(MoeNet(), "dfa", seed=0, taps="micro")
    attention = [("layers.0.self_attn", "output"), ("layers.1.self_attn", "output")]
    assert _sites(moe) == ["layers.0", attention[0], "layers.1", attention[1], "head"]
    F.cross_entropy(moe(torch.randn(2, 5, 4)), torch.tensor([0, 2])).backward()
    F.cross_entropy(stages(_image(16)), torch.arange(3)).backward()


def _record(model, names, at="input"):
    """h_i as each tap sees it (retain_grad: its .grad is then the tap's signal). Hooks made
    before convert run before the taps' own."""
    seen = {}
    for name in names:
        m = model.get_submodule(name)
        if at == "input":
            m.register_forward_pre_hook(
                lambda mod, args, n=name: seen.__setitem__(n, args[0]) or args[0].retain_grad()
            )
        else:
            m.register_forward_hook(
                lambda mod, a, out, n=name: seen.__setitem__(n, out[0]) or out[0].retain_grad()
            )
    return seen


@pytest.mark.parametrize("taps", ["macro", "micro"])
@pytest.mark.parametrize("rule", ["dfa", "drtp"])
def test_decoder_taps_receive_the_projected_signal_and_nothing_where_masked(rule, taps, float64):
    torch.manual_seed(0)
    model = Decoder()
    layers = ["model.layers.0", "model.layers.1", "lm_head"]
    attns = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    inputs, outputs = _record(model, layers), _record(model, attns if taps == "micro" else [], "output")
    feedalign.convert(model, rule, seed=2, taps=taps)
    expected = [layers[0], (attns[0], "output"), layers[1], (attns[1], "output"), layers[2]]
    assert _sites(model) == (expected if taps == "micro" else layers)
    y = model(_ids())
    y.retain_grad()
    labels = _labels(y)
    _loss(y, labels).backward()
    valid = labels != -100
    e = y.grad  # (N, T, V): zero rows where masked
    assert not e[~valid].any()
    signal = e if rule == "dfa" else -F.one_hot(labels.clamp(min=0), 13) * valid[..., None] / int(valid.sum())
    seen = {**inputs, **outputs}
    order = [s if isinstance(s, str) else s[0] for s in _sites(model)]
    for name, B in zip(order, feedalign.feedback(model)):
        torch.testing.assert_close(seen[name].grad, signal @ B, msg=name)  # (N, T, V) @ (V, d)
        assert not seen[name].grad[~valid].any()


def test_micro_refuses_a_block_without_attention_by_name():
    with pytest.raises(
        ValueError, match=r"block features.1.0 \(MBConv\) has no attention.*block \(Sequential\)"
    ):
        feedalign.convert(efficientnet(), "dfa", taps="micro")
    with pytest.raises(ValueError, match="taps must be one of macro, micro, got 'mini'"):
        feedalign.convert(Decoder(), "dfa", taps="mini")
    bert = feedalign.convert(Bertish(), "drtp", seed=0, taps="micro")
    assert [t.site for t in _taps(bert)][:2] == ["encoder.layer.0", "encoder.layer.0.attention"]


def test_a_conv_output_layer_takes_e_at_the_pooled_model_output(float64):
    torch.manual_seed(0)
    plain = SqueezeNet()
    for output in (None, "classifier"):
        model = copy.deepcopy(plain)
        site = "classifier" if output else "classifier.1"
        seen = _record(model, [site])
        feedalign.convert(model, "dfa", seed=3, output=output)
        x = _image()
        G = torch.randn(3, 3)
        (model(x) * G).sum().backward()  # e = G, over (N, C)
        h = seen[site]
        torch.testing.assert_close(h.grad, (G @ feedalign.feedback(model)[-1]).reshape(h.shape))
        plain.zero_grad()
        (plain(x) * G).sum().backward()
        head = model.get_submodule(site)
        for p, q in zip(head.parameters(), plain.get_submodule(site).parameters()):
            torch.testing.assert_close(p.grad, q.grad)  # the output layer: the true error
    model = feedalign.convert(SqueezeNet(), "drtp", seed=3)
    F.cross_entropy(model(_image()), torch.arange(3)).backward()
    per_position = feedalign.convert(SqueezeNet(pool=False), "dfa", seed=3)
    with pytest.raises(ValueError, match=r"must be \(N, C\).*per-position convolutional heads"):
        per_position(_image(16))  # (N, 3, 3, 3) logits


def test_target_signal_tells_masked_rows_from_saturated_ones():
    y = torch.tensor(
        [[1000.0, 0.0, 0.0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [2.0, 1.0, 0.0]], dtype=torch.float64
    )
    t = torch.tensor([0, 2, -100, 1])
    e = torch.func.grad(lambda y: F.cross_entropy(y, t, ignore_index=-100))(y)
    assert not e[2].any() and not e[0].any()  # masked, and saturated (p = one-hot exactly)
    expected = -F.one_hot(t.clamp(min=0), 3).double() / 3  # mean over the 3 unmasked rows
    expected[2] = 0
    torch.testing.assert_close(target_signal(e, y), expected)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    torch.testing.assert_close(target_signal(zeros, y[1:3]), zeros)  # every row masked


# --- real transformers models from tiny configs (random init, no downloads) ------------


def _hf(name):
    tr = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64)
    lm = dict(vocab_size=64, max_position_embeddings=16, **small)
    configs = {
        "gpt2": lambda: tr.GPT2LMHeadModel(
            tr.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
        ),
        "bert": lambda: tr.BertForMaskedLM(tr.BertConfig(**lm)),
        "llama": lambda: tr.LlamaForCausalLM(tr.LlamaConfig(num_key_value_heads=1, **lm)),
        "mistral": lambda: tr.MistralForCausalLM(tr.MistralConfig(num_key_value_heads=1, **lm)),
        "qwen2": lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(num_key_value_heads=1, **lm)),
        "vit": lambda: tr.ViTForImageClassification(
            tr.ViTConfig(image_size=8, patch_size=4, num_labels=3, **small)
        ),
    }
    torch.manual_seed(0)
    return configs[name]()


@pytest.mark.parametrize("taps", ["macro", "micro"])
@pytest.mark.parametrize("rule", ["dfa", "drtp"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "mistral", "qwen2", "vit"])
def test_transformers_models_get_one_tap_per_layer_and_learn_from_their_own_loss(name, rule, taps):
    model = feedalign.convert(_hf(name), rule, seed=0, taps=taps)
    layers = model.config.num_hidden_layers
    hidden = _taps(model)[:-1]  # the last: the output layer's input
    assert len(hidden) == layers * (1 if taps == "macro" else 2)
    assert sum(t.cuts == "output" for t in hidden) == (layers if taps == "micro" else 0)
    if name == "vit":
        out = model(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 2]))
    else:
        ids = _ids(2, 6, 64)
        labels = ids.clone()
        labels[0, :2] = -100
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if g is None
    ]
    assert all(n > 0 for n in _taps(model)[0].broadcast.sizes)  # no tap on ids or on the pixels


@pytest.mark.parametrize("rule", ["dfa", "fa"])
def test_gradient_checkpointing_reentrant_or_not_gives_the_same_gradients(rule):
    """transformers' gradient checkpointing, both kinds: a reentrant checkpoint gives a layer's
    parameters no gradient unless its input needs one, which a dfa tap's cut input does not."""
    grads = []
    ids = _ids(2, 6, 64)
    for reentrant in (None, False, True):
        model = _hf("llama")
        if reentrant is not None:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        feedalign.convert(model.train(), rule, seed=0)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for run in grads[1:]:
        for g, ref in zip(run, grads[0]):
            assert g is not None
            torch.testing.assert_close(g, ref)

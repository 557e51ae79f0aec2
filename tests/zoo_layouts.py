"""Models shaped like those of torchvision, timm and Hugging Face transformers, written
here for tests/test_direct_zoo.py (none of those libraries is a dependency): the same
module trees, call patterns and residuals, at toy sizes."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# --- Hugging Face shapes: a Llama-style decoder and a BERT-style encoder ----------------


class Attention(nn.Module):
    def __init__(self, d: int, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, hidden_states, attention_mask=None):  # (N, T, d) -> ((N, T, d), weights)
        n, t, d = hidden_states.shape
        q, k, v = (p(hidden_states).view(n, t, 2, d // 2).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o_proj(out.transpose(1, 2).reshape(n, t, d)), None


class GatedMLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            nn.Linear(d, 2 * d),
            nn.Linear(d, 2 * d),
            nn.Linear(2 * d, d),
        )

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Llama's: pre-norm; attention called by keyword; a residual after each half."""

    def __init__(self, d: int):
        super().__init__()
        self.self_attn, self.mlp = Attention(d), GatedMLP(d)
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, hidden_states, attention_mask=None):
        h = hidden_states + self.self_attn(hidden_states=self.input_layernorm(hidden_states))[0]
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(DecoderLayer(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, attention_mask=None)
        return self.norm(x)


class Decoder(nn.Module):
    """LlamaForCausalLM's layout: ids (N, T) -> logits (N, T, vocab); lm_head tied or not."""

    def __init__(self, vocab: int = 13, d: int = 8, layers: int = 2, tied: bool = False):
        super().__init__()
        self.model = DecoderModel(vocab, d, layers)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids):
        return self.lm_head(self.model(ids))


class PostNormAttention(nn.Module):
    """BertAttention: self-attention, projection, residual and norm inside; returns a tuple."""

    def __init__(self, d: int):
        super().__init__()
        self.self, self.dense, self.norm = Attention(d, causal=False), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, hidden_states, attention_mask=None):
        return (self.norm(self.dense(self.self(hidden_states)[0]) + hidden_states),)


class Output(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.dense, self.norm = nn.Linear(2 * d, d), nn.LayerNorm(d)

    def forward(self, h, residual):
        return self.norm(self.dense(h) + residual)


class EncoderLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attention = PostNormAttention(d)
        self.intermediate = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU())
        self.output = Output(d)

    def forward(self, hidden_states, attention_mask=None):
        a = self.attention(hidden_states, attention_mask)[0]
        return self.output(self.intermediate(a), a)


class Bertish(nn.Module):
    """BertForMaskedLM's layout: embeddings, encoder.layer, a transform and the decoder."""

    def __init__(self, vocab: int = 13, d: int = 8, layers: int = 2):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, d)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(EncoderLayer(d) for _ in range(layers))
        self.transform, self.decoder = nn.Linear(d, d), nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, None)
        return self.decoder(torch.tanh(self.transform(x)))


# --- torchvision shapes: DenseNet, squeezenet, EfficientNet / MobileNet -----------------


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, growth, 3, padding=1)

    def forward(self, features):  # the list of every earlier output
        return self.conv(torch.relu(self.norm(torch.cat(features, 1))))


class _DenseBlock(nn.ModuleDict):
    """torchvision's: its forward runs every child it holds."""

    def __init__(self, layers: int, c_in: int, growth: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(c_in + i * growth, growth))

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


def densenet():
    features = nn.Sequential(OrderedDict(
        conv0=nn.Conv2d(3, 4, 3, padding=1), denseblock1=_DenseBlock(2, 4, 2),
        transition1=nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AvgPool2d(2)),
        denseblock2=_DenseBlock(2, 4, 2),
    ))  # fmt: skip
    return Pooled(features, nn.Linear(8, 3))


class Pooled(nn.Module):
    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x):
        return self.classifier(torch.relu(self.features(x)).mean((2, 3)))


class Fire(nn.Module):
    def __init__(self, c_in: int, s: int, e: int):
        super().__init__()
        self.squeeze, self.expand1x1, self.expand3x3 = (
            nn.Conv2d(c_in, s, 1),
            nn.Conv2d(s, e, 1),
            nn.Conv2d(s, e, 3, padding=1),
        )

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)


class SqueezeNet(nn.Module):
    """squeezenet1_0's head: a 1×1 conv to the classes, ReLU, pooling; flattened after."""

    def __init__(self, pool: bool = True):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), Fire(8, 2, 4), Fire(8, 2, 4),
                                      nn.MaxPool2d(2), Fire(8, 2, 4))  # fmt: skip
        head = [nn.Dropout(0.0), nn.Conv2d(8, 3, 1), nn.ReLU()]
        self.classifier = nn.Sequential(*head, *([nn.AdaptiveAvgPool2d(1)] if pool else []))

    def forward(self, x):
        y = self.classifier(self.features(x))
        return torch.flatten(y, 1) if y.shape[-1] == 1 else y


class ConvNormAct(nn.Sequential):  # torchvision's Conv2dNormActivation: torch's forward
    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.SiLU())  # fmt: skip


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, expand: int, stride: int = 1):
        super().__init__()
        h = c_in * expand
        layers = [ConvNormAct(c_in, h, 1)] if expand != 1 else []
        layers += [
            ConvNormAct(h, h, 3, stride, groups=h),
            nn.Conv2d(h, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.block, self.residual = nn.Sequential(*layers), stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


def efficientnet():  # features: stem, stages of MBConvs (one alone), head conv
    stages = [nn.Sequential(MBConv(4, 4, 1)), nn.Sequential(MBConv(4, 6, 2, 2), MBConv(6, 6, 2))]
    features = nn.Sequential(ConvNormAct(3, 4, stride=2), *stages, ConvNormAct(6, 8, 1))
    return Pooled(features, nn.Sequential(nn.Dropout(0.0), nn.Linear(8, 3)))


def mobilenet():  # features: stem, the inverted residuals side by side, head conv
    blocks = [MBConv(4, 4, 1), MBConv(4, 6, 2, 2), MBConv(6, 6, 2)]
    features = nn.Sequential(ConvNormAct(3, 4, stride=2), *blocks, ConvNormAct(6, 8, 1))
    return Pooled(features, nn.Sequential(nn.Dropout(0.0), nn.Linear(8, 3)))


# --- nested repetitions: timm's stage modules, Mixtral's experts -------------------------


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class Stage(nn.Module):  # timm's ConvNeXtStage: a downsampling conv, then a chain of blocks
    def __init__(self, c: int):
        super().__init__()
        self.downsample, self.blocks = nn.Conv2d(c, c, 2, 2), nn.Sequential(Residual(c), Residual(c))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class MoeBlock(nn.Module):  # Mixtral's MLP: a router and a bank of experts, named "…Block"
    def __init__(self, d: int):
        super().__init__()
        self.gate, self.experts = nn.Linear(d, 3), nn.ModuleList(nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        weights = torch.softmax(self.gate(x), -1)
        return sum(weights[..., i : i + 1] * expert(x) for i, expert in enumerate(self.experts))


class MoeLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn, self.mlp = Attention(d), MoeBlock(d)

    def forward(self, x):
        x = x + self.self_attn(x)[0]
        return x + self.mlp(x)


class StageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stages, self.head = (
            nn.Conv2d(3, 4, 3),
            nn.Sequential(Stage(4), Stage(4)),
            nn.Linear(4, 3),
        )

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class MoeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.layers, self.head = (
            nn.Linear(4, 6),
            nn.ModuleList([MoeLayer(6), MoeLayer(6)]),
            nn.Linear(6, 3),
        )

    def forward(self, x):  # (N, T, 4) -> (N, 3)
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))

"""Real models from the three zoos (Hugging Face transformers, torchvision, timm),
built from small configs with random weights and no download, and `run_cell`:
one training step of a model under one rule, checked against plain back-prop.

    from zoo import catalogue, run_cell
    for entry in catalogue():
        print(entry.name, run_cell(entry, "fa"))

A zoo that does not import is left out of `catalogue()`; `missing()` says why.
Every builder returns a `Case`: the model, its inputs (a tensor, or keyword
arguments), targets and a loss computing a scalar from the model output and the
targets. The configs are tiny (width 32–64, 2 layers; convnets at 32×32 or 64×64,
batch 2) so that one step takes well under 2 s on two CPU cores; the timm models
of base width keep their width and lose depth (`depth=2`).

How a cell is judged (`run_cell`, the probes in bench/zoo_probe.py):
  refused  convert, or the first training forward, raised ValueError;
  crash    anything else raised;
  problems silent bp (a weight multiplied with something that needs an error, with
           no B, or whose B is never read: perturbing it changes no gradient), no
           grad (a parameter plain bp trains got none), non-finite, describe() crashed;
  ok       none of these; direct rules add the number of taps.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from zoo_probe import direct_probe, feedback_probe, grads, needs_feedback, taps_of

import feedalign

ZOOS = ("transformers", "torchvision", "timm")
BATCH, SEQ, VOCAB = 2, 8, 128
SEED_FORWARD = 1234  # reseeded before every forward: dropout masks are the same in every pass


@dataclass
class Case:
    model: nn.Module
    inputs: Tensor | dict[str, Tensor]
    targets: Tensor
    loss: Callable[[Any, Tensor], Tensor]  # (model output, targets) -> scalar


@dataclass(frozen=True)
class Entry:
    name: str  # "<zoo>/<model>", e.g. "transformers/gpt2"
    zoo: str  # the package it needs
    family: str  # the support table's row label
    build: Callable[[], Case]
    slow: bool = False  # over ~10 s for the five default rules: tests mark it slow


@dataclass(frozen=True)
class Cell:
    outcome: str  # "ok" | "refused" | "crash" | "problems"
    text: str  # what the table shows: "ok, 4 taps", "refused: …", "silent bp: …; no grad: …"
    seconds: float = 0.0

    def __str__(self) -> str:
        return self.text


# --- losses --------------------------------------------------------------------


def logits_of(out: Any) -> Tensor:
    """The logits of a model output: a tensor, a Hugging Face ModelOutput, or a tuple's first."""
    if isinstance(out, Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out[0]


def cross_entropy(out: Any, targets: Tensor) -> Tensor:
    """Softmax cross-entropy, mean over every sample and position: (N, [T,] C) vs (N, [T])."""
    y = logits_of(out)
    return F.cross_entropy(y.reshape(-1, y.shape[-1]), targets.reshape(-1))


def own_loss(out: Any, targets: Tensor) -> Tensor:
    """The loss the model computed itself from `labels=` (Hugging Face: -100 positions ignored)."""
    return out.loss


# --- Hugging Face transformers ----------------------------------------------------


def _hf(model_cls: str, config_cls: str, task: str, **config) -> Callable[[], Case]:
    """A transformers model from a tiny config; task: "lm" (ids -> per-token logits),
    "seq2seq" (T5: encoder and decoder ids), "cls" (ids -> 3 classes), "image"
    (pixels -> 10 classes), "labels" (lm with the model's own loss, some positions -100)."""

    def build() -> Case:
        tf = importlib.import_module("transformers")
        model = getattr(tf, model_cls)(getattr(tf, config_cls)(**config))
        ids = torch.randint(0, VOCAB, (BATCH, SEQ))
        if task == "image":
            return Case(model, {"pixel_values": torch.randn(BATCH, 3, 32, 32)},
                        torch.randint(0, 10, (BATCH,)), cross_entropy)  # fmt: skip
        if task == "cls":
            return Case(model, {"input_ids": ids}, torch.randint(0, 3, (BATCH,)), cross_entropy)
        targets = torch.randint(0, VOCAB, (BATCH, SEQ))
        if task == "seq2seq":
            return Case(model, {"input_ids": ids, "decoder_input_ids": ids.flip(1)}, targets, cross_entropy)
        if task == "labels":
            labels = targets.clone()
            labels[:, : SEQ // 2] = -100  # a prompt: no loss there
            return Case(model, {"input_ids": ids, "labels": labels}, labels, own_loss)
        return Case(model, {"input_ids": ids}, targets, cross_entropy)

    return build


_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
_BERT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=64)  # fmt: skip

HF = [
    ("gpt2", "GPT-2 (GPT2LMHeadModel)", "GPT2LMHeadModel", "GPT2Config", "lm",
     dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
          eos_token_id=0)),
    ("bert-mlm", "BERT (BertForMaskedLM)", "BertForMaskedLM", "BertConfig", "lm", _BERT),
    ("bert-cls", "BERT (BertForSequenceClassification)", "BertForSequenceClassification", "BertConfig",
     "cls", dict(_BERT, num_labels=3)),
    ("llama", "Llama (LlamaForCausalLM)", "LlamaForCausalLM", "LlamaConfig", "lm", _DEC),
    ("llama-labels", "Llama, own loss with labels= (-100 masked)", "LlamaForCausalLM", "LlamaConfig",
     "labels", _DEC),
    ("mistral", "Mistral (MistralForCausalLM)", "MistralForCausalLM", "MistralConfig", "lm", _DEC),
    ("qwen2", "Qwen2 (Qwen2ForCausalLM)", "Qwen2ForCausalLM", "Qwen2Config", "lm", _DEC),
    ("vit", "ViT (ViTForImageClassification)", "ViTForImageClassification", "ViTConfig", "image",
     dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=2, num_labels=10)),
    ("t5", "T5 (T5ForConditionalGeneration)", "T5ForConditionalGeneration", "T5Config", "seq2seq",
     dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
          decoder_start_token_id=0)),
    ("opt", "OPT (OPTForCausalLM)", "OPTForCausalLM", "OPTConfig", "lm",
     dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
          max_position_embeddings=64, word_embed_proj_dim=32)),
    ("gpt-neox", "GPT-NeoX (GPTNeoXForCausalLM)", "GPTNeoXForCausalLM", "GPTNeoXConfig", "lm",
     dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=2, max_position_embeddings=64)),
]  # fmt: skip


# --- torchvision and timm: images -> 10 classes ------------------------------------


def _images(package: str, make: Callable[[Any], nn.Module], size: int) -> Callable[[], Case]:
    def build() -> Case:
        model = make(importlib.import_module(package))
        x = torch.randn(BATCH, 3, size, size)
        return Case(model, x, torch.randint(0, 10, (BATCH,)), cross_entropy)

    return build


def _tv(name: str, size: int = 32, **kw) -> Callable[[], Case]:
    return _images("torchvision.models", lambda m: getattr(m, name)(num_classes=10, **kw), size)


def _tv_vit(m: Any) -> nn.Module:
    """vit_b_16 at 32×32; torchvision zeroes the head, so no error would leave it at the
    first step (under usf, B = s·sign(0) = 0) and the probe would see nothing: drawn instead."""
    model = m.vit_b_16(num_classes=10, image_size=32)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def _timm(name: str, size: int = 32, **kw) -> Callable[[], Case]:
    return _images("timm", lambda t: t.create_model(name, pretrained=False, num_classes=10, **kw), size)


TORCHVISION = [
    ("resnet18", _tv("resnet18"), False),
    ("densenet121", _tv("densenet121"), True),
    ("squeezenet1_0", _tv("squeezenet1_0", 64), False),
    ("mobilenet_v3_small", _tv("mobilenet_v3_small"), False),
    ("efficientnet_b0", _tv("efficientnet_b0"), True),
    ("convnext_tiny", _tv("convnext_tiny"), True),
    ("swin_t", _tv("swin_t"), True),
    ("vit_b_16", _images("torchvision.models", _tv_vit, 32), True),
]
TIMM = [
    ("vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=32), False),
    ("deit_tiny_patch16_224", _timm("deit_tiny_patch16_224", img_size=32), False),
    ("beit_base_patch16_224 (depth 2)", _timm("beit_base_patch16_224", img_size=32, depth=2), False),
    ("eva02_tiny_patch14_224", _timm("eva02_tiny_patch14_224", 28, img_size=28), False),
    ("swinv2_tiny_window8_256", _timm("swinv2_tiny_window8_256", 64, img_size=64), False),
    ("convnext_atto", _timm("convnext_atto"), False),
    ("efficientnet_b0", _timm("efficientnet_b0"), True),
    ("resnet18", _timm("resnet18", zero_init_last=False), False),  # timm zeroes bn2's scale: no error
    # would reach the residual branches at the first step, and the probe would see nothing there
]


def missing(zoo: str) -> str | None:
    """Why `zoo` cannot be used here (its import error), or None."""
    try:
        importlib.import_module({"torchvision": "torchvision.models"}.get(zoo, zoo))
    except Exception as e:  # any import failure leaves the zoo out, with its reason
        return f"{type(e).__name__}: {first_line(e)}"
    return None


def catalogue(zoos: tuple[str, ...] = ZOOS, usable_only: bool = True) -> list[Entry]:
    """The entries of `zoos` whose zoo imports (all with usable_only=False), in table
    order: transformers, torchvision, timm."""
    entries = [
        Entry(f"transformers/{k}", "transformers", f, _hf(m, c, t, **cfg)) for k, f, m, c, t, cfg in HF
    ]
    entries += [Entry(f"torchvision/{k}", "torchvision", f"torchvision {k}", b, s) for k, b, s in TORCHVISION]
    entries += [Entry(f"timm/{k.split()[0]}", "timm", f"timm {k}", b, s) for k, b, s in TIMM]
    usable = {z for z in zoos if not usable_only or missing(z) is None}
    return [e for e in entries if e.zoo in usable]


# --- one cell: a model, a rule, one training step ----------------------------------


def first_line(e: BaseException) -> str:
    """The message's first line (and the next, where the first ends with a colon)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [""]
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def forward_loss(case: Case, model: nn.Module) -> Tensor:
    torch.manual_seed(SEED_FORWARD)
    out = model(**case.inputs) if isinstance(case.inputs, dict) else model(case.inputs)
    return case.loss(out, case.targets)


def run_cell(entry: Entry, rule: str, *, seed: int = 0, probe: bool = True) -> Cell:
    """Build `entry` twice with the same weights, put `rule` on one copy
    (`feedalign.convert(model, rule, seed=0)`), run one step (forward, loss, backward)
    on both, and judge the converted copy (see the module docstring). probe=False
    skips the feedback probes (only crash / refusal / missing gradients)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    plain = entry.build()
    torch.manual_seed(seed)
    case = entry.build()
    case.model.load_state_dict(plain.model.state_dict())  # identical weights, however the builder draws
    plain.model.train()
    case.model.train()
    try:
        loss = forward_loss(plain, plain.model)
        need = needs_feedback(plain.model, loss)  # weights multiplied with something that needs an error
        loss.backward()
    except Exception as e:
        return Cell("crash", f"plain bp fails: {type(e).__name__}: {first_line(e)}", time.perf_counter() - t0)
    reference = grads(plain.model)

    stage = "convert"
    try:
        feedalign.convert(case.model, rule, seed=0)
        stage = "step"
        loss = forward_loss(case, case.model)
        loss.backward(retain_graph=probe)
    except ValueError as e:
        return Cell("refused", f"refused: {first_line(e)}", time.perf_counter() - t0)
    except Exception as e:
        return Cell(
            "crash", f"crash ({stage}): {type(e).__name__}: {first_line(e)}", time.perf_counter() - t0
        )

    problems = _check(case, loss, rule, reference, need, probe)
    seconds = time.perf_counter() - t0
    if problems:
        return Cell("problems", "; ".join(problems), seconds)
    text = "ok"
    if feedalign.RULES[rule].kind == "direct":
        n, on_ids = taps_of(case.model)
        text += f", {n} taps" + (f" ({on_ids} on integer inputs)" if on_ids else "")
    return Cell("ok", text, seconds)


def names(found: list[str], what: str, most: int = 3) -> str:
    """'7 weights (a, b, c (+4 more))'."""
    more = f" (+{len(found) - most} more)" if len(found) > most else ""
    return f"{len(found)} {what}{'s' if len(found) > 1 else ''} ({', '.join(found[:most])}{more})"


def _check(case: Case, loss: Tensor, rule: str, reference: dict, need: set[str], probe: bool) -> list[str]:
    """What is wrong with the converted copy after its step (empty: nothing)."""
    problems = []
    got = grads(case.model)
    if not torch.isfinite(loss).all() or any(g is not None and not g.isfinite().all() for g in got.values()):
        problems.append("non-finite loss or gradient")
    trains = rule != "shallow"  # shallow freezes every hidden parameter by design
    none = [n for n, g in reference.items() if trains and g is not None and g.any()
            and (got.get(n) is None or not got[n].any())]  # fmt: skip
    if probe:
        forward = lambda: forward_loss(case, case.model)  # noqa: E731
        kind = feedalign.RULES[rule].kind
        if kind == "per-layer":
            silent = feedback_probe(case.model, loss, forward, need, list(reference))
            if silent:
                problems.append(f"silent bp: {names(silent, 'weight')}")
        elif kind == "direct" and feedalign.RULES[rule].signal != "none":
            bypass = direct_probe(case.model, loss, forward, list(reference))
            if bypass:
                problems.append(f"bp path, no tap: {names(bypass, 'param')}")
    if none:
        problems.append(f"no grad: {names(none, 'param')}")
    try:
        feedalign.describe(case.model)
    except Exception as e:
        problems.append(f"describe() crashes: {type(e).__name__}: {first_line(e)}")
    return problems

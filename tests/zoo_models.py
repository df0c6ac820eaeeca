"""The model zoo: models of the ecosystem built from their libraries' configs at tiny sizes
(random initialization, CPU), each with a batch maker and a per-example loss.

transformers: GPT-2, Llama, Qwen2, BERT; peft: LoRA on Llama; timm: vit_tiny, convnext_atto;
torchvision's ResNet-18 and VisionTransformer architectures. torchvision's wheel that matches
torch 2.13 on the package index is a CUDA build whose C++ operators do not load on a CPU
torch (and timm imports torchvision), so the two torchvision architectures are also built
here from torch modules, module for module as torchvision builds them (``resnet18_torch``,
``vit_torch``: the same module kinds, names and parameter layout), and the torchvision and
timm entries run where those packages work.

Used by tests/test_zoo.py and benchmarks/zoo_coverage.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ecosystem

VOCAB, SEQ, CLASSES = 64, 6, 3


@dataclass
class ZooModel:
    """One zoo entry.

    Attributes:
        build: the model (skips the test when its library is not usable).
        batch: ``batch(n, generator)`` -> the inputs (a dict of keyword arguments).
        losses: ``losses(model, inputs)`` -> the ``(N,)`` per-example losses.
        kron: one Kronecker layer of each kind to check against the per-example reference,
            as ``{module name: "linear" | "linear_transposed" | "conv"}``.
        diagonal: one diagonally preconditioned parameter of each kind to check.
        frozen: parameters expected to be listed as frozen.
        left: parameter-name fragments expected to be left out (with ``other_params``
            "diagonal", after the first step), e.g. batch-shared position embeddings.
    """

    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], dict[str, Tensor]]
    losses: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    kron: dict[str, str]
    diagonal: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def _tokens(n: int, gen: torch.Generator) -> dict[str, Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (n, SEQ), generator=gen)}


def _lm_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    idx = inputs["input_ids"]
    logits = model(**inputs).logits[:, :-1]
    targets = idx[:, 1:]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return ce.reshape(idx.shape[0], -1).mean(dim=1)


def _cls_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    x = inputs["input_ids"] if "input_ids" in inputs else inputs["x"]
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out
    y = (x.reshape(x.shape[0], -1).sum(dim=1) % CLASSES).long()
    return F.cross_entropy(logits.float(), y, reduction="none")


def _images(n: int, gen: torch.Generator) -> dict[str, Tensor]:
    return {"x": torch.randn(n, 3, 16, 16, generator=gen)}


def _vision_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    logits = model(inputs["x"])
    y = (inputs["x"].mean(dim=(1, 2, 3)) > 0).long()
    return F.cross_entropy(logits, y, reduction="none")


# ------------------------------------------------------------------ transformers


def gpt2() -> nn.Module:
    tf = ecosystem.transformers()
    cfg = tf.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return tf.GPT2LMHeadModel(cfg)


def _llama_config(tf: Any, cls: str = "LlamaConfig") -> Any:
    return getattr(tf, cls)(
        num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=SEQ,
        use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip


def llama() -> nn.Module:
    tf = ecosystem.transformers()
    return tf.LlamaForCausalLM(_llama_config(tf))


def qwen2() -> nn.Module:
    tf = ecosystem.transformers()
    return tf.Qwen2ForCausalLM(_llama_config(tf, "Qwen2Config"))


def bert() -> nn.Module:
    tf = ecosystem.transformers()
    cfg = tf.BertConfig(
        num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        vocab_size=VOCAB, max_position_embeddings=SEQ, num_labels=CLASSES,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )  # fmt: skip
    return tf.BertForSequenceClassification(cfg)


def lora_llama() -> nn.Module:
    peft = ecosystem.load("peft")
    model = llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(model, cfg)


# ------------------------------------------------------------------ timm and torchvision


def vit_tiny() -> nn.Module:
    timm = ecosystem.load("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
        num_classes=CLASSES,
    )  # fmt: skip


def convnext_atto() -> nn.Module:
    timm = ecosystem.load("timm")
    return timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES)


def resnet18_torchvision() -> nn.Module:
    tv = ecosystem.load("torchvision")
    return tv.models.resnet18(num_classes=CLASSES)


def vit_torchvision() -> nn.Module:
    tv = ecosystem.load("torchvision")
    return tv.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=CLASSES,
    )  # fmt: skip


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN (+ downsample) -ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (stem, four stages of two BasicBlocks, fc) with the
    stage widths ``width · (1, 2, 4, 8)`` (torchvision: width 64)."""

    def __init__(self, num_classes: int = CLASSES, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = width
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            blocks = [
                BasicBlock(c, width * mult, stride),
                BasicBlock(width * mult, width * mult, 1),
            ]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c = width * mult
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class EncoderBlock(nn.Module):
    """torchvision's ViT EncoderBlock: pre-norm nn.MultiheadAttention and an MLP."""

    def __init__(self, heads: int, dim: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim), nn.Dropout(0.0)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        h, _ = self.self_attention(h, h, h, need_weights=False)
        x = x + self.dropout(h)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq: int, layers: int, heads: int, dim: int, mlp: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(*[EncoderBlock(heads, dim, mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """torchvision's VisionTransformer layout: conv_proj patches, a class token, the
    encoder with a learned position embedding (a parameter), heads.head."""

    def __init__(
        self, image_size: int = 16, patch: int = 8, layers: int = 2, heads: int = 2,
        dim: int = 16, mlp: int = 32, num_classes: int = CLASSES,
    ) -> None:  # fmt: skip
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        seq = (image_size // patch) ** 2 + 1
        self.encoder = Encoder(seq, layers, heads, dim, mlp)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        x = self.encoder(torch.cat([cls, x], dim=1))
        return self.heads(x[:, 0])


ZOO: dict[str, ZooModel] = {
    "gpt2": ZooModel(
        gpt2, _tokens, _lm_losses,
        kron={"transformer.h.0.mlp.c_fc": "linear_transposed", "lm_head": "linear"},
        diagonal=["transformer.h.0.ln_1.weight"],
        left=["transformer.wpe.weight"],
    ),
    "llama": ZooModel(
        llama, _tokens, _lm_losses,
        kron={"model.layers.0.self_attn.q_proj": "linear"},
        diagonal=["model.layers.0.input_layernorm.weight"],
    ),
    "qwen2": ZooModel(
        qwen2, _tokens, _lm_losses,
        kron={"model.layers.0.self_attn.k_proj": "linear"},
        diagonal=["model.norm.weight"],
    ),
    "bert": ZooModel(
        bert, _tokens, _cls_losses,
        kron={"bert.encoder.layer.0.intermediate.dense": "linear"},
        diagonal=["bert.encoder.layer.0.output.LayerNorm.weight"],
        left=["bert.embeddings.position_embeddings.weight"],
    ),
    "lora-llama": ZooModel(
        lora_llama, _tokens, _lm_losses,
        kron={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default": "linear"},
        frozen=["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
                "base_model.model.model.layers.0.input_layernorm.weight"],
    ),
    "vit_tiny (timm)": ZooModel(
        vit_tiny, _images, _vision_losses,
        kron={"blocks.0.mlp.fc1": "linear"}, diagonal=["blocks.0.norm1.weight"],
    ),
    "convnext_atto (timm)": ZooModel(
        convnext_atto, _images, _vision_losses,
        kron={"stem.0": "conv"}, diagonal=["stages.0.blocks.0.norm.weight"],
    ),
    "resnet18 (torchvision)": ZooModel(
        resnet18_torchvision, _images, _vision_losses, kron={"layer1.0.conv1": "conv"},
        left=["bn1.weight"],
    ),
    "VisionTransformer (torchvision)": ZooModel(
        vit_torchvision, _images, _vision_losses,
        kron={"conv_proj": "conv", "encoder.layers.encoder_layer_0.mlp.0": "linear"},
        diagonal=["encoder.ln.weight"], left=["class_token"],
    ),
    "resnet18 (torch-built)": ZooModel(
        ResNet18, _images, _vision_losses, kron={"layer1.0.conv1": "conv", "fc": "linear"},
        left=["bn1.weight"],
    ),
    "VisionTransformer (torch-built)": ZooModel(
        VisionTransformer, _images, _vision_losses,
        kron={"conv_proj": "conv", "encoder.layers.0.mlp.0": "linear"},
        diagonal=["encoder.ln.weight"], left=["class_token"],
    ),
}  # fmt: skip

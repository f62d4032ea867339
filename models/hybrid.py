"""The CNN-transformer hybrid classifier.

A convolutional stem learns local texture; its feature map, flattened into tokens with a
learned position embedding, goes through a transformer encoder for global context. The
pooled CNN features and the transformer's pooled embedding are concatenated
(``Z = [F_cnn || F_trans]``) and classified by fully connected layers. ``forward`` returns
logits (training uses cross-entropy on them); :class:`Probabilities` adds the softmax that
the exported model and the edge see. Attention is written out with plain matrix products so
the ONNX export needs no fused kernels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.descriptors import DescriptorBranch

__all__ = ["HybridConfig", "HybridNet", "Probabilities", "build_model"]


@dataclass(frozen=True)
class HybridConfig:
    """Shape of the network. Channels, size and classes come from the data."""

    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    stem_channels: tuple[int, ...] = (32, 64, 128)
    embed_dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    head_hidden: int = 128
    max_tokens: int = 64
    descriptors: bool = False  # the HOG + wavelet branch (models.descriptors)
    descriptor_dim: int = 32

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError("need at least one input channel and two classes")
        if self.embed_dim % self.heads:
            raise ValueError("embed_dim must be a multiple of heads")
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        object.__setattr__(self, "stem_channels", tuple(int(c) for c in self.stem_channels))

    @property
    def token_grid(self) -> tuple[int, int]:
        """Feature-map size after the stem's poolings (and an adaptive pool capping the
        token count at ``max_tokens``)."""
        h, w = self.image_size
        for _ in self.stem_channels[1:]:
            h, w = max(1, h // 2), max(1, w // 2)
        while h * w > self.max_tokens:
            h, w = max(1, (h + 1) // 2), max(1, (w + 1) // 2)
        return h, w

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["stem_channels"] = list(self.stem_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HybridConfig:
        return cls(**{**d, "image_size": tuple(d["image_size"]),
                      "stem_channels": tuple(d["stem_channels"])})


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.scale = heads, 1.0 / math.sqrt(dim // heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.drop(torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class _EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: self-attention and feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class HybridNet(nn.Module):
    """CNN stem -> tokens + positions -> transformer encoder; ``[F_cnn || F_trans]``, with
    the descriptor branch ``[F_cnn || F_trans || F_desc]``, -> FC."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        chans = (config.in_channels, *config.stem_channels)
        blocks: list[nn.Module] = []
        for i in range(len(config.stem_channels)):
            if i:
                blocks.append(nn.MaxPool2d(2, ceil_mode=False))
            blocks.append(_conv_block(chans[i], chans[i + 1]))
        self.stem = nn.Sequential(*blocks)
        self.grid = config.token_grid
        self.token_pool = nn.AdaptiveAvgPool2d(self.grid)
        width = config.stem_channels[-1]
        self.embed = nn.Linear(width, config.embed_dim)
        self.pos = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], config.embed_dim))
        self.encoder = nn.Sequential(*[
            _EncoderLayer(config.embed_dim, config.heads, config.mlp_ratio, config.dropout)
            for _ in range(config.depth)
        ])
        self.norm = nn.LayerNorm(config.embed_dim)
        self.descriptors = (DescriptorBranch(config.in_channels, config.descriptor_dim)
                            if config.descriptors else None)
        z_width = width + config.embed_dim + (config.descriptor_dim if config.descriptors else 0)
        self.head = nn.Sequential(
            nn.Linear(z_width, config.head_hidden), nn.ReLU(inplace=True),
            nn.Dropout(config.dropout), nn.Linear(config.head_hidden, config.num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``Z = [F_cnn || F_trans (|| F_desc)]`` for a batch ``(N, C, H, W)``."""
        fmap = self.stem(x)
        f_cnn = fmap.mean(dim=(2, 3))
        tokens = self.token_pool(fmap).flatten(2).transpose(1, 2)
        tokens = self.encoder(self.embed(tokens) + self.pos)
        f_trans = self.norm(tokens).mean(dim=1)
        if self.descriptors is None:
            return torch.cat([f_cnn, f_trans], dim=1)
        return torch.cat([f_cnn, f_trans, self.descriptors(x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Probabilities(nn.Module):
    """The exported form: softmax over ``logits / temperature`` (temperature fitted on the
    validation split, 1.0 when none)."""

    def __init__(self, net: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("inv_t", torch.tensor(1.0 / float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x) * self.inv_t, dim=1)


def build_model(config: HybridConfig, seed: int | None = None) -> HybridNet:
    """A freshly initialised network; with ``seed`` the weights are reproducible."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return HybridNet(config)
    return HybridNet(config)

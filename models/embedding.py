"""Embedding output options (InsightFace ``--version-output``): the layers between the last conv and the embedding.

Input ``(N, C, h, w) float32`` (the trunk's last feature map, 7x7 for 112x112 L-networks), output
``(N, emb_size)``; option A outputs ``(N, C)``. Definitions follow ``src/symbols/symbol_utils.py get_fc1``
(2018); "fixed-gamma BN" is ``BatchNorm1d`` with its scale frozen at 1.

==========  ==================================================================================
option      layers
==========  ==================================================================================
A           BN -> act -> global average pool (embedding size = channel count)
B           A -> FC
C / GAP     A -> FC -> fixed-gamma BN
D           A -> FC -> fixed-gamma BN -> act
AX..DX      as A..D with Dropout(0.2) after the pool (the README's "OptionXD"; ``XD`` and the 2017
            spellings ``AD``..``DD`` also accepted: ``AD`` = ``AX``, the seed's Inception default)
E           BN -> Dropout(p) -> FC on the flattened map -> fixed-gamma BN (LResNet*E*-IR, default)
F           BN -> Dropout(p) -> FC (2018 code; the README's wording "BN-PReLU-Dropout-FC-BN" differs)
G           BN -> FC;  H: FC;  I: BN -> FC -> fixed-gamma BN;  J: FC -> fixed-gamma BN
GDC         depthwise conv over the whole map (k = h x w, no pad) -> BN -> FC -> fixed-gamma BN
==========  ==================================================================================
"""
from __future__ import annotations

from torch import nn

from models.layers import FixedGammaBatchNorm1d, activation, batch_norm2d

POOLED_OPTIONS = ("A", "B", "C", "D")
OUTPUT_OPTIONS = ("A", "B", "C", "D", "AX", "BX", "CX", "DX", "E", "F", "G", "H", "I", "J", "GAP", "GDC")
POOLED_DROPOUT = 0.2


def normalize_option(option: str) -> str:
    """Canonical spelling of an output option (case-insensitive; ``XD`` -> ``DX``, ``GAP`` -> ``C``).

    The December 2017 spelling of the pooled options with dropout, a ``D`` suffix (``AD`` -- the
    seed README's default for the Inception networks --, ``BD``, ``CD``, ``DD``; ``symbol_utils.get_fc1``
    then tested ``fc_type[1] == 'D'``), is the later ``X`` suffix: ``AD`` -> ``AX``.
    """
    opt = str(option).strip().upper()
    if len(opt) == 2 and opt[0] == "X" and opt[1] in POOLED_OPTIONS:
        opt = opt[1] + "X"
    elif len(opt) == 2 and opt[0] in POOLED_OPTIONS and opt[1] == "D":
        opt = opt[0] + "X"
    if opt == "GAP":
        opt = "C"
    if opt not in OUTPUT_OPTIONS:
        raise ValueError(f"version_output {option!r} is not an embedding option "
                         f"(expected one of {', '.join(OUTPUT_OPTIONS)}, or XA..XD, AD..DD)")
    return opt


class EmbeddingHead(nn.Module):
    """Maps the last feature map ``(N, in_channels, h, w)`` to the embedding ``(N, out_features)``.

    ``dropout`` is the rate of options E and F (0.4 in InsightFace); ``act`` is the activation of A-D.
    """

    def __init__(self, option: str, in_channels: int, feature_size: tuple[int, int], emb_size: int = 512,
                 dropout: float = 0.4, act: str = "prelu"):
        super().__init__()
        opt = normalize_option(option)
        h, w = feature_size
        flat = in_channels * h * w
        self.option = opt
        layers: list[nn.Module]
        if opt[0] in POOLED_OPTIONS:
            layers = [batch_norm2d(in_channels), activation(act, in_channels), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            if opt.endswith("X"):
                layers.append(nn.Dropout(POOLED_DROPOUT))
            kind = opt[0]
            if kind == "A":
                emb_size = in_channels
            else:
                layers.append(nn.Linear(in_channels, emb_size))
                if kind in ("C", "D"):
                    layers.append(FixedGammaBatchNorm1d(emb_size))
                if kind == "D":
                    layers.append(activation(act, emb_size))
        elif opt == "GDC":
            layers = [nn.Conv2d(in_channels, in_channels, (h, w), groups=in_channels, bias=False),
                      batch_norm2d(in_channels), nn.Flatten(), nn.Linear(in_channels, emb_size),
                      FixedGammaBatchNorm1d(emb_size)]
        else:
            bn_first = opt in ("E", "F", "G", "I")
            drop = opt in ("E", "F")
            bn_last = opt in ("E", "I", "J")
            layers = [batch_norm2d(in_channels)] if bn_first else []
            if drop:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Flatten(), nn.Linear(flat, emb_size)]
            if bn_last:
                layers.append(FixedGammaBatchNorm1d(emb_size))
        self.out_features = emb_size
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)

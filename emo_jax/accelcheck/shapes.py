"""Problem sizes of the accelerator check: EMO's layer shape, and a tiny one for CPU.

Letters: T tokens, D d_model, E experts (routed + shared), H expert hidden, K experts per
token (shared included), S sequence length, B = T / S rows, NH heads of HD.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shapes:
    name: str
    tokens: int  # T
    d_model: int  # D
    experts: int  # E, one of them shared
    hidden: int  # H
    top_k: int  # K, shared included
    seq: int  # S
    heads: int  # NH
    head_dim: int  # HD
    vocab: int  # the training step's vocabulary
    layers: int  # the training step's layers
    check_tokens: int  # T of the MoE correctness case at the full widths D, E, H, K
    small: tuple[int, int, int, int, int]  # (T, K, E, D, H) of the small MoE correctness case
    attention_small: tuple[int, int, int, int]  # (B, S, NH, HD) of the small attention case
    block_rows: int  # aligned block rows of the Pallas MoE kernels (the gmm M tile)
    tile_rows: int | None  # gather tile (None: the kernel set's default)
    tile_tokens: int | None  # combine tile (None: the kernel set's default)
    attention_block: int  # flash attention tiles
    repeats: int  # timed calls per benchmark row (median)
    min_doc: int  # document lengths of the packed rows
    max_doc: int

    @property
    def batch(self) -> int:
        return self.tokens // self.seq


# EMO (configs/emo_1b14b.yaml): d_model 2048, 128 experts (1 shared) of hidden 1024, top-8,
# 16 heads of 128, seq 4096; 8192 tokens = 2 rows. The step's vocabulary is 16384, not
# EMO's 100352: with 2 layers the full head would be 60 % of the step's FLOPs, with 16384
# it is 20 %, close to its 16 % share in the 16-layer model.
EMO = Shapes(name="emo", tokens=8192, d_model=2048, experts=128, hidden=1024, top_k=8, seq=4096, heads=16,
             head_dim=128, vocab=16384, layers=2, check_tokens=256, small=(512, 8, 16, 256, 256),
             attention_small=(2, 512, 4, 64), block_rows=128, tile_rows=None, tile_tokens=None,
             attention_block=128, repeats=5, min_doc=64, max_doc=2048)

# Tiny: every code path of the EMO run at CPU-interpretable sizes. Tiles of 16 (tl.dot's
# minimum), as the interpret-mode tests use.
TINY = Shapes(name="tiny", tokens=64, d_model=32, experts=8, hidden=32, top_k=4, seq=32, heads=2, head_dim=16,
              vocab=128, layers=2, check_tokens=32, small=(16, 2, 6, 16, 16), attention_small=(2, 40, 2, 16),
              block_rows=16, tile_rows=16, tile_tokens=8, attention_block=16, repeats=2, min_doc=4, max_doc=16)

SHAPES = {s.name: s for s in (EMO, TINY)}

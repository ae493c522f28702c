"""Tools to study the algorithms: `analysis` (how information travels through a mask,
layer after layer), `draw` (masks as text and PNG pictures), `trace` (the tiled kernel's
online softmax and backward, tile by tile) and `explain` (all of it for one small
problem, as text). spec/analysis.md and spec/trace.md describe them."""

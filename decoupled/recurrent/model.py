"""The recurrent core (LSTM or GRU with a linear readout) and the synthetic gradient predictor.

The core's state is one flat tensor per sequence, (B, S): for each layer its h (and, for an LSTM,
its c), concatenated. A segment starts from such a tensor and ends with one, so a predictor can
map the state to dL/dstate, and a segment's initial state can be a leaf whose ``.grad`` is the
gradient that reached the boundary.
"""

from __future__ import annotations

import torch
from torch import nn


class RecurrentModel(nn.Module):
    def __init__(self, cell: str, input_size: int, hidden: int, layers: int, output_size: int) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.cell, self.hidden, self.layers = cell, hidden, layers
        self.parts = 2 if cell == "lstm" else 1  # (h, c) or h
        self.rnn = rnn(input_size, hidden, layers, batch_first=True)
        self.readout = nn.Linear(hidden, output_size)

    @property
    def state_size(self) -> int:
        return self.layers * self.parts * self.hidden

    def initial_state(self, batch: int) -> torch.Tensor:
        p = self.readout.weight
        return torch.zeros(batch, self.state_size, dtype=p.dtype, device=p.device)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, t, inputs), ``state`` (B, S) -> logits (B, t, outputs), top-layer outputs (B, t, hidden),
        final state (B, S)."""
        b = x.shape[0]
        # (B, S) -> (layers, B, hidden) per part; the reverse at the end, so the state stays one tensor
        parts = state.view(b, self.layers, self.parts, self.hidden).permute(2, 1, 0, 3)
        if self.cell == "lstm":
            out, (h, c) = self.rnn(x, (parts[0].contiguous(), parts[1].contiguous()))
            final = torch.stack([h, c])
        else:
            out, h = self.rnn(x, parts[0].contiguous())
            final = h.unsqueeze(0)
        return self.readout(out), out, final.permute(2, 1, 0, 3).reshape(b, self.state_size)


class SyntheticGradientPredictor(nn.Module):
    """Maps a segment's final state (and, if ``input_size``, the next segment's first input) to the
    gradient that later segments would send into it, in per-sequence units (see tbptt.py).

    ``linear`` as in the DNI paper's RNN experiments, or an MLP with one hidden layer. The output
    layer starts at zero, as in decoupled/rules/dni.py: an untrained predictor sends no gradient
    rather than noise, so DNI starts out as plain truncated BPTT.
    """

    def __init__(self, state_size: int, input_size: int = 0, kind: str = "linear", hidden: int = 256) -> None:
        super().__init__()
        self.input_size = input_size
        width = state_size + input_size
        layers: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU()] if kind == "mlp" else []
        out = nn.Linear(hidden if kind == "mlp" else width, state_size)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, state: torch.Tensor, next_input: torch.Tensor | None = None) -> torch.Tensor:
        if self.input_size:
            state = torch.cat([state, next_input], dim=1)
        return self.net(state)

"""Synthetic gradients for recurrent networks: learning beyond the truncation window (DNI paper, section 3.1).

``config`` (SequenceConfig), ``tasks`` (copy, repeat copy, character LM), ``model`` (LSTM/GRU core and the
synthetic gradient predictor), ``tbptt`` (the segment loop and one run), ``compare`` (T x method grids),
``cli`` (``decoupled sequence`` and ``decoupled sequence-compare``).
"""

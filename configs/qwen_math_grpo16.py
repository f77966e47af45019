# The paper's real setting (v2 Table 1, App. C.1) for GPU users: 16-GRPO on Qwen2.5-Math-1.5B, trained on MATH.
# Needs the weights and data locally or a reachable hub: Qwen/Qwen2.5-Math-1.5B, DigitalLearningGmbH/MATH-lighteval.
# Paper: 8.53 h on 4 GPUs for 10 epochs, MATH-500 Mean@32 70.24. Single GPU: expect several times that.
# For 2-GRPO use configs/qwen_math_grpo2.py (k=2, 256 prompts per update, lr 8e-6).
# Plan (python train.py configs/qwen_math_grpo16.py --dry_run --gpu=h200 --gpus=4): fits at a 55 GiB peak per GPU,
# the sampler decoding 256 of each GPU's 2048 rollouts at a time in a <= 40 GiB bf16 KV cache; ~82 s a step, ~3.3 h
# for 146 steps. Estimates from plan.py's formulas (2026-12-07), never run on a GPU.
# Run: torchrun --nproc_per_node=4 train.py configs/qwen_math_grpo16.py (DDP; compiled decode and training forward).
# FSDP2 (weights/grads/AdamW sharded) is not combined with --compile (untested, refused):
#   torchrun --nproc_per_node=4 train.py configs/qwen_math_grpo16.py --fsdp=True --compile=False
# old_logp = recompute: bf16 sampling on a GPU gives log-probs that differ from the trainer's.
model = "Qwen/Qwen2.5-Math-1.5B"
data = "hf:DigitalLearningGmbH/MATH-lighteval"
eval_data = "hf:HuggingFaceH4/MATH-500"
fallbacks = "boxed"
algo = "grpo"
k = 16
prompts_per_step = 512      # verl data.train_batch_size (v3 section 5.2)
prompts_per_update = 32     # verl actor.ppo_mini_batch_size: 16 updates per generation batch
lr = 1e-6
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
sample_mem_gib = 40         # KV cache per GPU: generate the 2048 rollouts in chunks of whole prompts that fit
dtype = "bfloat16"
old_logp = "recompute"        # verl's compute_log_prob: pi_old from the trainer's own forward
grad_ckpt = True
compile = True
out_dir = "out/qwen_math_grpo16"

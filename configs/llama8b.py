"""Llama-3.1-8B-Instruct on one GPU (the README's run as a file):

    python run_pipeline.py configs/llama8b.py                 # every step
    python train_sae.py configs/llama8b.py --m=16384          # one script; later settings win

Download the model once on a machine with network (huggingface-cli download meta-llama/Llama-3.1-8B-Instruct).
Activations take tokens x 4096 x 2 bytes (8 KiB per token in float16).
"""
MODEL_NAME = "meta-llama/Llama-3.1-8B-Instruct"
LAYER_IDX = 16
BATCH_TOKENS = 32768
M = 4096
K = 32
